"""Errors a user can fix: each carries every problem found, with where it was found."""

from __future__ import annotations


class InputError(Exception):
    """Bad input (params, data files, checkpoints). The CLI prints it and exits with status 2.

    ``problems`` holds one line per problem, each naming the file/line/key and what to do,
    so a user sees all of them at once rather than fixing them one run at a time.
    """

    def __init__(self, summary: str, problems: list[str] | None = None):
        self.summary = summary
        self.problems = list(problems or [])
        super().__init__(self.__str__())

    def __str__(self) -> str:
        if not self.problems:
            return self.summary
        lines = [f"{self.summary} ({len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}):"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)
