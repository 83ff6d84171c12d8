"""Progress bars: redrawn in a terminal, whole lines in a log file, off when asked."""

import io

from napari_sam.core import progress_bar as bars


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _run(monkeypatch, stream, **kwargs):
    monkeypatch.setattr("sys.stderr", stream)
    with bars.progress_bar(total=5, desc="embedding", unit="tile", **kwargs) as bar:
        for _ in range(5):
            bar.update(1)
    return stream.getvalue()


def test_a_log_file_gets_whole_lines_not_carriage_returns(monkeypatch):
    text = _run(monkeypatch, io.StringIO())
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0].startswith("embedding:   0%") and lines[-1].startswith("embedding: 100%")
    assert "5/5" in lines[-1] and len(lines) <= 3  # the start, the end, and no redraw in between


def test_a_terminal_gets_the_redrawn_bar(monkeypatch):
    text = _run(monkeypatch, _Terminal())
    assert "\r" in text and "5/5" in text


def test_bars_are_off_when_asked(monkeypatch):
    assert _run(monkeypatch, io.StringIO(), progress=False) == ""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert _run(monkeypatch, _Terminal()) == ""


def test_a_notebook_bar_is_left_as_tqdm_makes_it(monkeypatch):
    # in Jupyter stderr is no terminal, but the widget bar must not become log lines
    import tqdm.auto
    from tqdm.std import tqdm as plain

    made = {}

    class Notebook(plain):
        def __init__(self, *args, **kwargs):
            made.update(kwargs)
            super().__init__(*args, **kwargs)

    Notebook.__module__ = "tqdm.notebook"

    class Auto(Notebook):  # as tqdm.auto defines its class in Jupyter
        pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Auto)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    bars.progress_bar(total=2, desc="x").close()
    assert "file" not in made and "mininterval" not in made
