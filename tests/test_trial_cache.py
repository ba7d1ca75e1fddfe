"""The sweep's trial cache: finished trials survive a restart, and processes sharing it split the trials."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

from peekaboo.bench import trial_cache
from peekaboo.bench.trial_cache import TrialCache


def claimed(path, **owner_changes):
    """A cache that claimed trial "a", and its claim file rewritten with ``owner_changes``."""
    holder = TrialCache(path)
    assert holder.claim("a")
    claim = holder._claim_path("a")
    claim.write_text(json.dumps({**json.loads(claim.read_text()), **owner_changes}))
    return holder, claim


def age(claim, seconds: float) -> None:
    """Make a claim look untouched for ``seconds``."""
    old = time.time() - seconds
    os.utime(claim, (old, old))


def test_finished_trials_are_read_back_and_merged(tmp_path):
    path = tmp_path / "cache.json"
    one, two = TrialCache(path), TrialCache(path)
    assert one.claim("a") and two.claim("b")
    one.put("a", {"100": 0.5})
    two.put("b", {"100": 0.6})  # two had not seen a: a merge, not an overwrite
    assert json.loads(path.read_text()) == {"a": {"100": 0.5}, "b": {"100": 0.6}}
    assert TrialCache(path).get("a") == {"100": 0.5}
    assert not TrialCache(path).claim("a")  # finished: nobody runs it again
    assert not (tmp_path / "cache.json.claims").exists() or not any((tmp_path / "cache.json.claims").iterdir())


def test_a_trial_another_live_process_claimed_is_not_run_twice(tmp_path):
    path = tmp_path / "cache.json"
    mine, other = TrialCache(path), TrialCache(path)
    assert other.claim("a")  # a live process (this one) holds it
    assert not mine.claim("a")
    assert mine.claim("b")
    other.release("a")
    assert mine.claim("a")


def test_the_claim_of_a_stopped_process_is_taken_over(tmp_path):
    path = tmp_path / "cache.json"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claimed(path, pid=int(gone.stdout))  # its process has exited
    assert TrialCache(path).claim("a")
    assert TrialCache(path, poll_seconds=0.01).wait("b") is None  # nobody runs b: no waiting forever


def test_another_machines_claim_nobody_touched_for_long_is_stale(tmp_path):
    path = tmp_path / "cache.json"
    holder, claim = claimed(path, host="another-machine")
    assert not TrialCache(path).claim("a")  # another machine's live claim is trusted...
    age(claim, trial_cache.STALE_SECONDS + 1)
    assert TrialCache(path).claim("a")  # ...until nobody has touched it for STALE_SECONDS
    holder.release("a")  # the holder lost it: its release leaves the new owner's claim alone
    assert claim.exists()


def test_touching_keeps_a_claim_fresh(tmp_path):
    holder, claim = claimed(tmp_path / "cache.json", host="another-machine")
    age(claim, trial_cache.STALE_SECONDS + 1)
    holder.touch("a")  # its holder still owns it (the token is unchanged)
    assert not TrialCache(tmp_path / "cache.json").claim("a")
    # On this machine a live process's claim holds however long its trial takes.
    claim.write_text(json.dumps({**json.loads(claim.read_text()), "host": socket.gethostname()}))
    age(claim, trial_cache.STALE_SECONDS + 1)
    assert not TrialCache(tmp_path / "cache.json").claim("a")


def test_a_claim_left_by_an_earlier_process_with_this_pid_is_stale(tmp_path):
    # A restarted container gives the sweep the pid its killed predecessor had.
    path = tmp_path / "cache.json"
    claimed(path, token="the-earlier-process")
    assert TrialCache(path).claim("a")


def test_waiting_returns_the_trial_another_process_finishes(tmp_path):
    path = tmp_path / "cache.json"
    other = TrialCache(path)
    assert other.claim("a")

    def finish() -> None:
        time.sleep(0.2)
        other.put("a", {"200": 0.7})

    thread = threading.Thread(target=finish)
    thread.start()
    assert TrialCache(path, poll_seconds=0.05).wait("a") == {"200": 0.7}
    thread.join()


def test_without_a_file_everything_stays_in_memory():
    cache = TrialCache(None)
    assert cache.claim("a") and cache.claim("a")
    cache.put("a", 1)
    assert cache.get("a") == 1 and cache.load() == {"a": 1}


def test_stored_keys_are_read_in_todays_form(tmp_path):
    path = tmp_path / "cache.json"
    path.write_text(json.dumps({"OLD-a": 1}))
    cache = TrialCache(path, normalize=lambda key: key.removeprefix("OLD-"))
    assert cache.get("a") == 1 and not cache.claim("a")  # found, so nobody runs it again
    cache.put("b", 2)
    assert json.loads(path.read_text()) == {"a": 1, "b": 2}  # the file is rewritten in today's form


def test_a_sweep_trial_stored_before_a_setting_existed_is_found_under_todays_key():
    from tests_support import REPO_CONFIGS

    from peekaboo.bench.methods import method_config, settings_key
    from peekaboo.bench.sweep import trial_key

    scoring = json.dumps({"snapshots": [50, 100], "pairs": 48})
    today = settings_key(method_config((), (), REPO_CONFIGS, scenes="objects"))
    stored = json.loads(today)
    del stored["optimization"]["restarts"]["choose_at"]  # as written before the setting existed
    stored["model"]["channels_last"] = False  # and while speed switches still counted
    old = json.dumps(stored, sort_keys=True) + scoring
    assert old != today + scoring and trial_key(old) == trial_key(today + scoring)
    other = settings_key(method_config(("optimization.loss.gravity=0.1",), (), REPO_CONFIGS, scenes="objects"))
    assert trial_key(other + scoring) != trial_key(today + scoring)
