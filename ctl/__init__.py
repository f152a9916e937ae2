"""fleetwatchctl: the operator's command line (status, alerts, offline detection, demo, eval)."""
