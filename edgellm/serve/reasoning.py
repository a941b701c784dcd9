"""Split streamed model text into reasoning (<think> ... </think>) and content, for any model.

Model-agnostic: the parser knows only the two tags. Text inside a block is reasoning, everything else content,
and the tags themselves are dropped. Whether the output *starts* inside a block is read from the rendered prompt:
templates such as Qwen3's or DeepSeek-R1's end the generation prompt with an open `<think>` (the model then writes
only `... </think> answer`), while `enable_thinking=False` templates close the block in the prompt.
A tag split across stream pieces is held back until it is complete, like a stop string.
"""

from __future__ import annotations

THINK_START, THINK_END = "<think>", "</think>"


def starts_in_reasoning(prompt_text: str, start: str = THINK_START, end: str = THINK_END) -> bool:
    """True when the prompt leaves a reasoning block open (its last `start` comes after its last `end`)."""
    i = prompt_text.rfind(start)
    return i >= 0 and i > prompt_text.rfind(end)


class ReasoningParser:
    def __init__(self, in_reasoning: bool = False, start: str = THINK_START, end: str = THINK_END):
        self.in_reasoning, self.start, self.end = in_reasoning, start, end
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, str]:
        """Append `piece`; return the (reasoning, content) text that is now certain."""
        self.pending += piece
        reasoning, content = [], []
        while True:
            tag = self.end if self.in_reasoning else self.start
            out = reasoning if self.in_reasoning else content
            i = self.pending.find(tag)
            if i >= 0:
                out.append(self.pending[:i])
                self.pending = self.pending[i + len(tag):]
                self.in_reasoning = not self.in_reasoning
                continue
            hold = next((n for n in range(min(len(tag) - 1, len(self.pending)), 0, -1)
                         if self.pending.endswith(tag[:n])), 0)
            out.append(self.pending[: len(self.pending) - hold])
            self.pending = self.pending[len(self.pending) - hold:]
            return "".join(reasoning), "".join(content)

    def flush(self) -> tuple[str, str]:
        """End of stream: a held-back partial tag is plain text of the current block."""
        rest, self.pending = self.pending, ""
        return (rest, "") if self.in_reasoning else ("", rest)


def split_reasoning(text: str, in_reasoning: bool = False) -> tuple[str, str]:
    """Whole-text form of ReasoningParser: (reasoning, content)."""
    p = ReasoningParser(in_reasoning)
    r1, c1 = p.feed(text)
    r2, c2 = p.flush()
    return r1 + r2, c1 + c2
