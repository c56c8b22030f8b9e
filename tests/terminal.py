"""A tiny terminal for tests of what ``netota`` draws: it applies the few control sequences the
progress display writes (carriage return, erase line, cursor up N lines, erase below, colours) to
a list of lines, and keeps every line as it was drawn, so a test can check what a person saw."""

from __future__ import annotations

import re

_TOKEN = re.compile(r"\x1b\[([0-9;]*)([A-Za-z])|(\r)|(\n)|([^\x1b\r\n]+)")


class Screen:
    def __init__(self, width: int) -> None:
        self.width = width
        self.lines: list[str] = [""]
        self.row = 0
        self.col = 0
        self.drawn: list[str] = []  # every line as it stood when the cursor left it or it was redrawn
        self.overflows: list[str] = []  # text written past the right edge (the terminal would wrap it)

    def feed(self, output: str) -> Screen:
        for command_args, command, cr, newline, text in _TOKEN.findall(output):
            if command == "m":
                continue
            if command == "F":  # to the start of the line N lines up
                self._leave()
                self.row, self.col = max(0, self.row - int(command_args or 1)), 0
            elif command == "K":  # erase the whole line (2K)
                self.lines[self.row] = ""
            elif command == "J":  # erase to the end of the screen
                self.lines[self.row] = self.lines[self.row][: self.col]
                del self.lines[self.row + 1 :]
            elif command:
                raise AssertionError(f"unexpected escape sequence {command_args}{command!r}")
            elif cr:
                self._leave()
                self.col = 0
            elif newline:
                self._leave()
                self.row, self.col = self.row + 1, 0
                if self.row == len(self.lines):
                    self.lines.append("")
            else:
                line = self.lines[self.row]
                line = line.ljust(self.col)
                self.lines[self.row] = line[: self.col] + text + line[self.col + len(text) :]
                self.col += len(text)
                if self.col > self.width:
                    self.overflows.append(self.lines[self.row])
        return self

    def _leave(self) -> None:
        if self.lines[self.row]:
            self.drawn.append(self.lines[self.row])

    @property
    def shown(self) -> list[str]:
        """What the screen shows now, without the empty last line."""
        lines = list(self.lines)
        while lines and lines[-1] == "":
            lines.pop()
        return lines
