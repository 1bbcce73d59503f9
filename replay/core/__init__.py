"""The data model (Request in, RequestRecord out), errors, and the Target protocol."""
