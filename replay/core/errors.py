"""Error kinds, and the user-facing error type.

Every failure of a request is counted under one of these kinds (strings, so summaries and
issues name them plainly). Library exceptions are mapped to kinds at each target's
boundary, never deeper in the engine.
"""

from __future__ import annotations

# Request error kinds.
CONNECT_REFUSED = "connect_refused"
CONNECT_TIMEOUT = "connect_timeout"
CONNECTION_RESET = "connection_reset"  # reset/aborted stream after connecting
FIRST_TOKEN_TIMEOUT = "first_token_timeout"
STALL = "stall"  # no token for N seconds mid-stream
TOTAL_TIMEOUT = "total_timeout"
MALFORMED = "malformed_response"  # bad SSE / JSON / not an OpenAI response
TRUNCATED = "truncated_stream"  # ended without [DONE] / finish_reason
CANCELLED = "client_cancelled"
TARGET_ERROR = "target_error"  # in-process backend raised
TARGET_DIED = "target_died"  # the target's model process exited or was killed mid-run


def http_status_kind(status: int) -> str:
    return f"http_{status}"


# Not-sent reasons.
NOT_SENT_STOPPED = "stopped"  # run stopped (signal, deadline) before its intended time
NOT_SENT_DEADLINE = "past_deadline"
NOT_SENT_OVERLOAD = "max_in_flight"  # too many outstanding requests: the client protects itself
# A conversation's later turns after one of its turns did not end ok (error, abandoned, unfinished):
# the user does not go on, and the turns that would have followed are counted here, not lost.
NOT_SENT_SESSION_ENDED = "session_ended"


class ReplayError(Exception):
    """A user-facing problem: printed as one line, exit code non-zero, no traceback."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
