"""Where `parse_point` was: `benchmarks/run_all.py` imports it from here until it imports
`splitexit.commands.calibrate` (the `splitexit calibrate` command) directly."""

from splitexit.commands.calibrate import parse_point

__all__ = ["parse_point"]
