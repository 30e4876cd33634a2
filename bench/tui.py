"""Can the TUI keep up with the model? Per denoising step, the time the app spends showing the step
(ghost-text edit, syntax highlights, canvas panel, one repaint of the visible editor) next to the
time the model spent on that step, in one run, for a small file and a large one; and, for the large
file, the same with TextArea's own full re-highlight after every draft edit instead of the editor's
shifted highlights (the ratio between the two is what the shift buys).

A ratio well below 1 means the animation costs little next to the model; near or above 1 means the
UI, not the model, would set the pace of the animation (the app then skips to the newest step).

    OMP_NUM_THREADS=1 python bench/tui.py [--model DIR] [--requests 4] [--large FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from textual.geometry import Region

from dg_edit import Done, Engine, Step
from dg_edit.tui.app import DgEditApp, ModelEvent
from dg_edit.tui.editor import EditorArea

SMALL = 'import os\n\n\ndef add(a, b):\n    return a + b\n\n\ndef main():\n    \n    print(add(1, 2))\n'


class TimedApp(DgEditApp):
    """The real app, timing how long each step takes to reach the screen."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ui_ms: list[float] = []  # per step shown
        self.model_ms_per_step: list[float] = []  # per request: Done.ms / Done.steps
        self.steps_computed = 0

    def on_model_event(self, message: ModelEvent) -> None:
        t0 = time.perf_counter()
        super().on_model_event(message)
        editor = self.editor
        editor.render_lines(Region(0, 0, editor.size.width, editor.size.height))  # one full repaint
        event = message.event
        if isinstance(event, Step):
            self.ui_ms.append((time.perf_counter() - t0) * 1000)
        elif isinstance(event, Done) and event.steps:
            self.model_ms_per_step.append(event.ms / event.steps)
            self.steps_computed += event.steps


class FullRehighlightEditor(EditorArea):
    """The editor as it would be without shifting highlights: every draft re-queries the syntax tree."""

    def _replace_unrecorded(self, text, start, end, *, draft: bool = False):
        return super()._replace_unrecorded(text, start, end, draft=False)


class FullRehighlightApp(TimedApp):
    def compose(self):
        for widget in super().compose():
            if isinstance(widget, EditorArea):
                widget = FullRehighlightEditor("", language=widget.language, id="editor")
            yield widget


async def measure(path: Path, engine: Engine, cursor: tuple[int, int], requests: int,
                  app_class: type[TimedApp] = TimedApp) -> TimedApp:
    app = app_class(path, engine=engine)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        app.show_canvas = True
        for _ in range(requests):
            app.editor.move_cursor(cursor)
            await pilot.press("ctrl+space")
            while app.request is not None:
                await pilot.pause(0.01)
            await pilot.press("escape")
            await pilot.pause()
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--large", default=argparse.__file__, help="a large file (default: the stdlib's argparse.py)")
    args = parser.parse_args(argv)
    engine = Engine.load(args.model)

    with tempfile.TemporaryDirectory() as tmp:
        small = Path(tmp) / "small.py"
        small.write_text(SMALL)
        large = Path(tmp) / "large.py"
        text = Path(args.large).read_text(encoding="utf-8")
        large.write_text(text)
        middle_row = text.count("\n") // 2
        print(f"model {engine.name}, {args.requests} infill requests per file; medians per step:")
        print(f"{'file':<26}{'lines':>7}{'model ms':>10}{'UI ms':>8}{'UI/model':>10}{'steps shown':>14}")
        runs = [("small", small, (8, 4), TimedApp),
                (f"large ({Path(args.large).name})", large, (middle_row, 0), TimedApp),
                ("large, full re-highlight", large, (middle_row, 0), FullRehighlightApp)]
        ui_by_label = {}
        for label, path, cursor, app_class in runs:
            app = asyncio.run(measure(path, engine, cursor, args.requests, app_class))
            if not app.ui_ms or not app.model_ms_per_step:
                print(f"{label:<26} no steps were shown")
                continue
            ui_med, model_med = statistics.median(app.ui_ms), statistics.median(app.model_ms_per_step)
            ui_by_label[label] = ui_med
            lines = path.read_text().count("\n") + 1
            shown = f"{len(app.ui_ms)}/{app.steps_computed}"
            print(f"{label:<26}{lines:>7}{model_med:>10.1f}{ui_med:>8.1f}{ui_med / model_med:>10.2f}{shown:>14}")
        shifted, full = ui_by_label.get(runs[1][0]), ui_by_label.get(runs[2][0])
        if shifted and full:
            print(f"UI time per step on the large file, full re-highlight / shifted highlights: {full / shifted:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
