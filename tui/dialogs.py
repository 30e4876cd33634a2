"""Modal questions the editor asks: confirm a choice, describe a rewrite, read an error.

Each dialog dismisses with a plain value (a choice key, a `RewriteRequest`, or None for cancel) so
the app decides what happens next; dialogs never touch the buffer.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static



def default_strength() -> float:
    """The engine's own default strength, read from its signature so there is one source for it.

    Imported here, when the dialog first needs it, rather than at start-up: the engine module brings
    in torch, and the editor should appear before the model has loaded.
    """
    from dg_edit.engine import Engine

    return inspect.signature(Engine.stream_rewrite).parameters["strength"].default


class ConfirmScreen(ModalScreen[str | None]):
    """Ask a question with a few answers; dismisses with the chosen key (None on escape)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, question: str, choices: list[tuple[str, str]], **kwargs):
        super().__init__(**kwargs)
        self.question = question
        self.choices = choices  # (key, label); the key is what dismiss returns

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self.question, classes="question")
            with Horizontal(classes="buttons"):
                for i, (key, label) in enumerate(self.choices):
                    yield Button(label, id=f"choice-{key}", variant="primary" if i == 0 else "default")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(event.button.id.removeprefix("choice-"))

    def action_cancel(self) -> None:
        self.dismiss(None)


class MessageScreen(ModalScreen[None]):
    """Show a problem in a sentence, with one button to close it."""

    BINDINGS = [Binding("escape,enter,q", "close", "Close")]

    def __init__(self, title: str, message: str, button: str = "OK", **kwargs):
        super().__init__(**kwargs)
        self.title_text = title
        self.message = message
        self.button = button

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog error"):
            yield Static(self.title_text, classes="title")
            yield Static(self.message, classes="question")
            with Horizontal(classes="buttons"):
                yield Button(self.button, id="close", variant="error")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(None)

    def action_close(self) -> None:
        self.dismiss(None)


@dataclass(frozen=True)
class RewriteRequest:
    instruction: str | None
    strength: float


def parse_strength(value: str) -> float:
    """A strength typed by a person: a number in [0, 1]; raises ValueError with the reason."""
    try:
        strength = float(value.strip()) if value.strip() else default_strength()
    except ValueError:
        raise ValueError(f"strength must be a number between 0 and 1, not {value!r}") from None
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be between 0 and 1, got {strength:g}")
    return strength


class RewriteScreen(ModalScreen[RewriteRequest | None]):
    """Ask for an optional instruction and a strength (how much of the selection to re-denoise)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Rewrite the selection", classes="title")
            yield Label("Instruction (optional):")
            yield Input(placeholder="e.g. use a list comprehension", id="instruction")
            yield Label("Strength, 0 = keep … 1 = redo everything:")
            yield Input(value=f"{default_strength():g}", id="strength")
            yield Static("", id="rewrite-error", classes="problem")
            with Horizontal(classes="buttons"):
                yield Button("Rewrite", id="go", variant="primary")
                yield Button("Cancel", id="cancel")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self._submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "go":
            self._submit()
        else:
            self.dismiss(None)

    def _submit(self) -> None:
        try:
            strength = parse_strength(self.query_one("#strength", Input).value)
        except ValueError as e:
            self.query_one("#rewrite-error", Static).update(str(e))
            return
        instruction = self.query_one("#instruction", Input).value.strip() or None
        self.dismiss(RewriteRequest(instruction=instruction, strength=strength))

    def action_cancel(self) -> None:
        self.dismiss(None)
