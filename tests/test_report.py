"""report.html is self-contained and shows report.json's numbers; report.md carries the new statistics."""
from __future__ import annotations

import base64
import copy
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from edgecompress import report as reports

from testkit import PNG_SIGNATURE, small_run_dir

SUBJECTS = ("teacher", "student_fp32", "artifact")


@pytest.fixture(scope="session")
def small_run(tmp_path_factory, fashion_raw, teacher_spec) -> Path:
    return small_run_dir(tmp_path_factory, fashion_raw, teacher_spec)


@pytest.fixture(scope="module")
def written(small_run) -> tuple[dict, str]:
    verify = small_run / "verify"
    return json.loads((verify / "report.json").read_text()), (verify / "report.html").read_text()


class Page(HTMLParser):
    """Every tag with its attributes, the text of <style>, and each number span with its text."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.styles: list[str] = []
        self.numbers: list[tuple[dict, str]] = []
        self._open_number: dict | None = None
        self._in_style = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        self._in_style = tag == "style"
        if tag == "span" and "data-key" in attributes:
            self._open_number = attributes
            self.numbers.append((attributes, ""))

    def handle_endtag(self, tag):
        self._in_style = False
        if tag == "span":
            self._open_number = None

    def handle_data(self, data):
        if self._in_style:
            self.styles.append(data)
        if self._open_number is not None:
            attributes, text = self.numbers[-1]
            self.numbers[-1] = (attributes, text + data)


def at(report: dict, key: str):
    """report.json's value at a dotted path (list positions as numbers), resolved independently of report.py."""
    value = report
    for part in key.split("."):
        value = value[int(part)] if part.isdigit() else value[part]
    return value


def test_html_is_self_contained(small_run, written):
    _, text = written
    page = Page(text)
    lowered = text.lower()
    assert "http://" not in lowered and "https://" not in lowered and "file:" not in lowered
    tag_names = {tag for tag, _ in page.tags}
    assert not tag_names & {"script", "link", "iframe", "object", "embed", "base"}
    for style in page.styles:
        assert "url(" not in style and "@import" not in style
    images = [attrs for tag, attrs in page.tags if tag == "img"]
    assert len(images) == 3
    for tag, attrs in page.tags:
        for name in ("src", "href", "srcset", "poster", "data"):
            if name in attrs:
                assert tag == "img" and name == "src" and attrs[name].startswith("data:image/png;base64,")
    embedded = sorted(base64.b64decode(a["src"].split(",", 1)[1], validate=True) for a in images)
    assert all(png.startswith(PNG_SIGNATURE) for png in embedded)
    on_disk = sorted(p.read_bytes() for p in (small_run / "verify" / "plots").glob("*.png"))
    assert embedded == on_disk  # the HTML shows exactly the plots written beside it


def test_html_numbers_equal_report_json(written):
    report, text = written
    numbers = Page(text).numbers
    assert len(numbers) > 100
    shown = set()
    for attrs, displayed in numbers:
        key = attrs["data-key"]
        exact = json.loads(attrs["data-value"])
        assert exact == at(report, key), key
        scale = float(attrs["data-scale"])
        decimals = len(displayed.split(".")[1]) if "." in displayed else 0
        assert float(displayed.replace(",", "")) == pytest.approx(exact * scale, abs=0.5 * 10 ** -decimals + 1e-9), key
        shown.add(key)
    batches = list(report["artifact"]["latency_ms"])
    required = {"speedup_vs_teacher", "size_ratio", "accuracy_drop_pt", "data.eval_images",
                "accuracy_differences.artifact_minus_teacher.value",
                "accuracy_differences.artifact_minus_teacher.ci95.0",
                "accuracy_differences.artifact_minus_teacher.ci95.1", "artifact.agreement", "student_fp32.agreement"}
    for name in SUBJECTS:
        required |= {f"{name}.accuracy", f"{name}.accuracy_ci95.0", f"{name}.accuracy_ci95.1", f"{name}.top5",
                     f"{name}.params", f"{name}.size_bytes"}
        required |= {f"{name}.per_class_accuracy.{c}" for c in range(10)}
        for b in batches:
            required |= {f"{name}.latency_ms.{b}.{field}" for field in
                         ("p50", "p50_ci95.0", "p50_ci95.1", "p90", "p99", "throughput_ips")}
    required |= {f"artifact.confusion_matrix.{i}.{j}" for i in range(10) for j in range(10)}
    assert required <= shown, sorted(required - shown)


def test_html_escapes_text_from_the_data_and_stays_self_contained(written):
    report = copy.deepcopy(written[0])
    report["data"]["classes"][0] = '<img src="http://example.invalid/x.png">'
    report["host"]["cpu"] = "<script>alert(1)</script>"
    images = {stem: PNG_SIGNATURE for stem in ("tradeoff", "per_class", "latency")}
    page = Page(reports.html_report(report, images))
    assert [tag for tag, _ in page.tags].count("img") == 3
    assert "script" not in {tag for tag, _ in page.tags}


def test_markdown_shows_intervals_per_class_accuracy_and_the_confusion_matrix(written):
    report, _ = written
    text = reports.markdown(report)
    for name in SUBJECTS:
        m = report[name]
        low, high = m["accuracy_ci95"]
        assert f"{m['accuracy'] * 100:.2f}% [{low * 100:.2f}, {high * 100:.2f}]" in text
        p50 = m["latency_ms"]["bs1"]
        assert f"{p50['p50']:.3f} [{p50['p50_ci95'][0]:.3f}, {p50['p50_ci95'][1]:.3f}]" in text
    assert "## Per-class top-1" in text and "## Confusion matrix of the artifact" in text
    row = report["artifact"]["confusion_matrix"][3]
    assert f"| {report['data']['classes'][3]} | " + " | ".join(map(str, row)) + " |" in text
    assert "max latency none," in text


def test_many_classes_plot_the_artifacts_weakest_and_skip_the_confusion_table(written):
    report = copy.deepcopy(written[0])
    classes = 40
    report["data"]["classes"] = [f"c{i}" for i in range(classes)]
    report["data"]["eval_per_class"] = [5] * classes
    for name in SUBJECTS:
        report[name]["per_class_accuracy"] = [(i % 10) / 10 for i in range(classes)]
    report["artifact"]["per_class_accuracy"][7] = None  # a class without eval images is never plotted
    shown = reports.plotted_classes(report)
    assert len(shown) == reports.MAX_CLASSES_PLOTTED and 7 not in shown
    assert max(report["artifact"]["per_class_accuracy"][c] for c in shown) <= 0.7
    assert reports.plot_per_class(report).startswith(PNG_SIGNATURE)
    assert "Confusion matrix" not in reports.markdown(report)


def test_markdown_names_the_int8_kernels_and_the_measured_student_candidates(written):
    report = copy.deepcopy(written[0])
    kernels = report["artifact"]["kernels"]
    assert kernels["all_compute_int8"] and kernels["int8_compute_layers"] > 0 and not kernels["float_compute_layers"]
    assert f"{kernels['int8_compute_layers']} compute layers fused to int8; left in float: none" in \
        reports.markdown(report)
    report["student_selection"] = {
        "max_latency_ms": 0.2, "batch": "bs1", "chosen": "resnet_slim_100", "rule": "the largest that fits",
        "candidates": [{"name": "resnet_slim_050", "params": 19810, "p50_ms": 0.099, "fits": True},
                       {"name": "resnet_slim_100", "params": 77754, "p50_ms": 0.107, "fits": True},
                       {"name": "resnet_slim_150", "params": 173842, "p50_ms": 0.249, "fits": False}]}
    text = reports.markdown(report)
    assert "| resnet_slim_100 (chosen) | 77,754 | 0.107 | yes |" in text
    assert "| resnet_slim_150 | 173,842 | 0.249 | no |" in text and "the largest that fits" in text


def test_report_carries_the_quantize_stage_tries(written, small_run):
    report = written[0]
    calibration = json.loads((small_run / "quantize" / "calibration.json").read_text())
    q = report["quantization"]
    assert q["scheme"] == calibration["scheme"]["name"] == "onnxruntime-x86-qdq"
    assert len(q["tries"]) == len(calibration["tries"]) >= 1 and q["excluded_nodes"] == calibration["excluded_nodes"]
    assert all({"kind", "selection_top1", "excluded_nodes", "latency_bs1_ms"} <= set(t) for t in q["tries"])
    text = reports.markdown(report)
    assert "## Quantization tries (onnxruntime-x86-qdq" in text
    assert f"| 0 | ptq | {calibration['tries'][0]['calibration']} |" in text


def test_markdown_shows_class_names_literally(written):
    """A class named with Markdown and HTML syntax stays one literal cell: the table keeps its columns, no tag
    or emphasis appears, and removing the escapes gives the name back."""
    import re

    report = copy.deepcopy(written[0])
    name = 'a|b *bold* _it_ [x](http://example.invalid) <img src="y.png"> `c`'
    report["data"]["classes"][2] = name
    text = reports.markdown(report)
    row = next(line for line in text.splitlines() if line.startswith("| a\\|b"))
    cells = re.split(r"(?<!\\)\|", row)[1:-1]
    assert len(cells) == 5, cells  # class, eval images, teacher, student fp32, artifact
    assert "<img" not in text and "[x](" not in text
    shown = cells[0].strip().replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    assert re.sub(r"\\(.)", r"\1", shown) == name
