"""Files and processes, safely: atomic writes that never follow a planted symlink, locks, private files;
processes identified by (pid, start time) before any signal."""
