"""One error hierarchy. Raised with the file, the place and the fix; caught once at the
CLI/server boundary and printed as one line (`--debug` shows the traceback)."""

from __future__ import annotations


class QpackError(Exception):
    """Base of every error qpack reports to a user as one clear line."""


class GGUFError(QpackError):
    """A GGUF file (or region) is malformed: names the file, the byte offset and what is wrong."""

    def __init__(self, path: str, offset: int | None, problem: str):
        self.path = path
        self.offset = offset
        self.problem = problem
        where = f" at byte {offset}" if offset is not None else ""
        super().__init__(f"{path}: not a valid GGUF file{where}: {problem}")


class UnsupportedModel(QpackError):
    """A well-formed model that qpack cannot run (architecture, tensor type, tokenizer)."""


class EmbeddedModelError(QpackError):
    """The executable's own zip/model member is missing, truncated or misaligned."""


class ContextOverflow(QpackError):
    """A prompt (plus the requested tokens) does not fit the context."""


class ApiError(QpackError):
    """A request the server refuses: HTTP status plus OpenAI's error fields
    (`{"error": {"message", "type", "param", "code"}}`)."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }
