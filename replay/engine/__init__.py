"""The engine: sends a schedule's Requests to a Target, open loop or closed loop."""
