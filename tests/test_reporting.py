from speclabel.core.reporting import Reporter, progress_text


def test_progress_text_gives_rate_and_eta():
    text = progress_text("label DR1", 120, 1000, 10.0, "rows", "3 quarantined")
    assert text == "label DR1: 120/1000 rows (3 quarantined), 12.00 rows/s, ETA 1.2 min"
    assert progress_text("ingest", 50, None, 5.0, "stars") == "ingest: 50 stars, 10.00 stars/s"
    assert "ETA" not in progress_text("label", 10, 10, 1.0, "rows")


def test_progress_lines_are_throttled_but_the_final_one_always_comes():
    now = [0.0]
    lines = []
    reporter = Reporter(lines.append, every_s=10.0, clock=lambda: now[0])
    reporter.start("label")
    for t, done in ((1.0, 10), (5.0, 50), (11.0, 110), (12.0, 120)):
        now[0] = t
        reporter.progress("label", done, 200)
    now[0] = 13.0
    reporter.progress("label", 130, 130, final=True)
    assert lines == [
        "label: 110/200 rows, 10.00 rows/s, ETA 0.1 min",
        "label: 130/130 rows, 10.00 rows/s",
    ]


def test_lines_and_progress_can_go_to_different_places():
    out, err = [], []
    reporter = Reporter(out.append, progress_echo=err.append, every_s=0.0)
    reporter.line("summary")
    reporter.progress("x", 1, 2, final=True)
    assert out == ["summary"] and len(err) == 1
