"""The tqdm progress bars: what the training bar shows, and that they stay quiet off a terminal."""

from __future__ import annotations

import io

from eetq_lora.training.progress import TrainingProgress, format_duration, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_format_duration():
    assert [format_duration(s) for s in (0, 75, 3725)] == ["0:00", "1:15", "1:02:05"]


def test_training_bar_shows_step_loss_throughput_and_eta():
    screen = Terminal()
    bar = TrainingProgress(total=10, stream=screen)
    bar.started -= 4.0  # as if 4 s had passed
    bar.update(2, 1.2345, tokens=800)
    bar.close()
    text = screen.getvalue()
    assert "training:" in text and "2/10" in text and "loss 1.2345" in text
    rate = float(text.split(" tok/s")[0].split(", ")[-1].replace(",", ""))
    assert 150 <= rate <= 200  # 800 tokens in a little over 4 s
    assert "ETA 0:1" in text  # 8 steps left at about 2 s each


def test_a_resumed_bar_counts_speed_and_eta_from_its_own_steps():
    screen = Terminal()
    bar = TrainingProgress(total=10, start=6, stream=screen)
    bar.started -= 4.0
    bar.update(8, 0.5, tokens=400)  # 2 steps of this run in 4 s: 2 steps left take about 4 s
    bar.close()
    text = screen.getvalue()
    assert "8/10" in text and "ETA 0:04" in text
    assert 80 <= float(text.split(" tok/s")[0].split(", ")[-1]) <= 100


def test_bars_are_quiet_off_a_terminal_or_when_turned_off():
    log, screen = io.StringIO(), Terminal()
    for stream, enabled in ((log, True), (screen, False)):
        bar = TrainingProgress(total=40, stream=stream, enabled=enabled)
        for step in range(1, 41):
            bar.update(step, 1.0, tokens=1)
        bar.close()
        other = progress_bar(5, "scoring", "batch", stream=stream, enabled=enabled)
        other.update(5)
        other.close()
    assert log.getvalue() == "" and screen.getvalue() == ""


def test_notes_go_above_a_shown_bar_or_to_the_log():
    screen, logged = Terminal(), []
    shown = TrainingProgress(total=4, stream=screen)
    shown.note("step 2: held-out loss 1.0", logged.append)
    shown.close()
    assert "step 2: held-out loss 1.0" in screen.getvalue() and logged == []
    hidden = TrainingProgress(total=4, stream=io.StringIO())
    hidden.note("step 2: held-out loss 1.0", logged.append)
    assert logged == ["step 2: held-out loss 1.0"]
