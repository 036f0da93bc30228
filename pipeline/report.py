"""Human-readable forms of report.json."""
from __future__ import annotations


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def markdown(r: dict) -> str:
    rows = [("teacher", r["teacher"]), ("student fp32", r["student_fp32"]), ("artifact", r["artifact"])]
    batches = list(r["artifact"]["latency_ms"])
    head = "| model | runtime | top-1 | agreement | params | size | " + " | ".join(
        f"{b} p50 / p90 / p99 (ms)" for b in batches) + " |"
    lines = [f"# edgecompress report: {r['target']}", "",
             f"Data: {r['data']['name']}, {r['data']['eval_images']} eval images. "
             f"Host: {r['host']['cpu']} ({', '.join(r['host']['cpu_flags'])}).", "",
             head, "|" + "---|" * (6 + len(batches))]
    for name, m in rows:
        lat = " | ".join(f"{m['latency_ms'][b]['p50']:.3f} / {m['latency_ms'][b]['p90']:.3f} / "
                         f"{m['latency_ms'][b]['p99']:.3f}" for b in batches)
        agreement = f"{m['agreement'] * 100:.2f}%" if "agreement" in m else "-"
        lines.append(f"| {name} | {m['runtime']} | {m['accuracy'] * 100:.2f}% | {agreement} | {m['params']:,} | "
                     f"{_mb(m['size_bytes'])} | {lat} |")
    b = r["budgets"]
    lines += ["", f"- Speedup vs teacher ({batches[0]} p50): **{r['speedup_vs_teacher']:.1f}x**",
              f"- Size ratio: **{r['size_ratio']:.1f}x**",
              f"- Accuracy drop vs teacher: **{r['accuracy_drop_pt']:.2f} points**",
              f"- Budgets (max drop {b['max_accuracy_drop']} pt, max latency {b['max_latency_ms'] or 'none'} ms, "
              f"min speedup {b['min_speedup'] or 'none'}x): **{'passed' if b['passed'] else 'FAILED'}**"]
    lines += [f"  - {f}" for f in b["failed"]]
    if r["unverified"]:
        lines += ["", "Not verified on this host:"] + [f"- {u}" for u in r["unverified"]]
    return "\n".join(lines) + "\n"
