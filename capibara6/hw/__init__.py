"""The machine we run on: CPU probes at install (`probes`) and the build flags they decide (`decide`).

Standard library only, so `scripts/_install.sh` can run `python -m capibara6.hw` before anything else
is installed.
"""
