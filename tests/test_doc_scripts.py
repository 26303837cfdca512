"""The scripts that make the README's pictures: screenshot_report.py --only-rows (a report page with only some
rows' counterfactual sections) and compose_grids.py (the first rows of jobs' grid.png side by side)."""
import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cfx_cli.commands import report
from cfx_cli.outputs import JobWriter
from conftest import ROOT
from test_report import make_job, metrics, rows


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def two_rows(tmp_path):
    """A report of two jobs, DiME and FastDiME, 3 samples each: two rows, two counterfactual sections."""
    for m in ("dime", "fastdime"):
        make_job(tmp_path / m, method=m, metrics=metrics(1.0, 1.0, 10.0), samples=rows([0, 1, 2]))
    out, _ = report.report([str(tmp_path / "dime"), str(tmp_path / "fastdime")])
    return out


def test_only_rows_hides_the_other_sections_and_names_a_missing_row(two_rows, tmp_path):
    shot = load("screenshot_report")
    page = two_rows.read_text(encoding="utf-8")
    assert page.count("<section data-row=") == 2
    kept = shot.only_rows(page, ["method=fastdime"])
    # the page itself is unchanged; one style hides every section, then shows FastDiME's
    assert kept.replace(kept[kept.find("<style>section[data-row]"):kept.find("</head>")], "") == page
    assert '<style>section[data-row]{display:none} section[data-row="method=fastdime"]{display:block}</style>' in kept
    with pytest.raises(ValueError) as e:
        shot.only_rows(page, ["method=ace"])
    assert "'method=ace' is not a row" in str(e.value) and "'method=dime'; 'method=fastdime'" in str(e.value)
    # the command line: one error line, exit 2
    assert shot.main([str(two_rows), str(tmp_path / "x.png"), "--only-rows", "method=ace"]) == 2
    assert not (tmp_path / "x.png").exists()


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="/usr/bin/chromium is absent")
def test_only_rows_page_is_shorter_by_one_section(two_rows, tmp_path):
    """What Chromium draws: with one of two sections hidden the page's content ends higher up."""
    shot = load("screenshot_report")
    heights = {}
    for name, args in (("all", []), ("one", ["--only-rows", "method=dime"])):
        png = tmp_path / f"{name}.png"
        assert shot.main([str(two_rows), str(png), "--width", "1000", "--height", "3000", "--trim", *args]) == 0
        heights[name] = Image.open(png).height
    assert heights["one"] < heights["all"] < 3000


def grid_job(folder: Path, n: int) -> np.ndarray:
    """A job folder with ``n`` samples (8×8 images) and the grid.png that the job writer draws from them."""
    rng = np.random.default_rng(0)
    samples = rows(range(n))
    for r in samples:
        r["outcome"] = "real"
    folder.mkdir(parents=True)
    pd.DataFrame(samples).to_csv(folder / "samples.csv", index=False)
    for i in range(n):
        for kind in ("original", "counterfactual", "diff"):
            (folder / "images" / kind).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / "images" / kind / f"{i}.png")
    JobWriter(folder).write_grid()
    return np.asarray(Image.open(folder / "grid.png").convert("RGB"))


def test_compose_grids_keeps_the_top_rows_of_each_grid(tmp_path):
    compose = load("compose_grids")
    a, b = grid_job(tmp_path / "a", 4), grid_job(tmp_path / "b", 10)  # b's grid holds 8 rows, not 10
    row_a, row_b = a.shape[0] // 4, b.shape[0] // 8
    out = tmp_path / "both.png"
    assert compose.main([str(out), "--rows", "2", "--gap", "5", str(tmp_path / "a"), "A", str(tmp_path / "b"), "B"]) == 0
    c = np.asarray(Image.open(out).convert("RGB"))
    title_h = c.shape[0] - 2 * row_a
    assert c.shape[1] == a.shape[1] + 5 + b.shape[1] and title_h > 0
    np.testing.assert_array_equal(c[title_h:, :a.shape[1]], a[:2 * row_a])
    np.testing.assert_array_equal(c[title_h:title_h + 2 * row_b, a.shape[1] + 5:], b[:2 * row_b])
    assert (c[title_h:, a.shape[1]:a.shape[1] + 5] == 255).all()  # the gap is white


def test_compose_grids_refuses_a_folder_without_a_grid_and_odd_pairs(tmp_path, capsys):
    compose = load("compose_grids")
    (tmp_path / "empty").mkdir()
    assert compose.main([str(tmp_path / "o.png"), str(tmp_path / "empty"), "title"]) == 2
    assert "grid.png does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compose.main([str(tmp_path / "o.png"), str(tmp_path / "empty")])
    assert "even number" in capsys.readouterr().err
