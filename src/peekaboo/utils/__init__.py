"""Leaf helpers with no Peekaboo concepts in them: images in and masks out, atomic files, overlays, devices,
console logging."""
