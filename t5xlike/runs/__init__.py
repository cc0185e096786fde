"""The runs the commands execute: `python -m t5xlike.<command>` parses its flags and gin
files (`t5xlike/<command>.py`), then calls its run here, `<command>_run.py`: validation
first (nothing written), then the work."""
