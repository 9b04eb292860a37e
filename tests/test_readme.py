"""The README's promises that can drift: the Quick start commands, CI's command, the configuration reference."""

import re
from pathlib import Path

from s2t.config import reference_markdown

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def quick_start_commands() -> list[str]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_quick_start_has_exactly_two_commands():
    commands = quick_start_commands()
    assert len(commands) == 2, commands
    assert all("\n" not in c for c in commands), "each Quick start command is one line"
    assert commands[0].endswith("s2t run")


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert quick_start_commands()[1] in ci_lines


def test_configuration_reference_is_current():
    section = README.split("<!-- config-reference:start", 1)[1].split("<!-- config-reference:end -->", 1)[0]
    table = section.split("-->\n", 1)[1]
    assert table == reference_markdown(), "regenerate the README table from s2t.config.reference_markdown()"


# ---- the benchmark section (issue #16) -------------------------------------------------------------------

def _readme_section():
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    import readme_section

    return readme_section


def _paired(a, b, acc_a, acc_b, p, highlight=False):
    return {"a": a, "b": b, "n": 100, "accuracy_a": acc_a, "accuracy_b": acc_b, "difference": acc_a - acc_b,
            "difference_ci95": [acc_a - acc_b - 0.1, acc_a - acc_b + 0.1], "only_a": 1, "only_b": 2,
            "mcnemar_p": p, "margin": 0.01, "verdict": "undecided", "highlight": highlight}


def test_paper_section_reports_the_ordering_link_by_link_and_what_was_not_run():
    rs = _readme_section()
    row = lambda name, mode, correct, **kw: {  # noqa: E731
        "mode": name, "kind": "accuracy", "request_mode": mode, "n": 100, "correct": correct,
        "accuracy": correct / 100, "accuracy_ci95": [0.1, 0.9], "llm_positions_per_token": 0.0,
        "llm_forwards_per_token": 0.0, "changed_per_token": 0.0, "wall_s": 10.0, "tokens_per_s": 5.0,
        "cache": {"computed": 0}, **kw}
    payload = {"command": "python bench/run_bench.py", "date": "d", "commit": "c", "machine": {"cpu": "cpu"},
               "settings": {"accuracy_max_new_tokens": 512, "worker": {"num_candidates": 8}},
               "rows": [row("greedy", "greedy", 25), row("maj8", "maj8", 20, samples=8, temperature=0.7, top_p=0.8,
                                                         pass_at_8=0.6, pass_at_8_correct=60,
                                                         pass_at_8_ci95=[0.5, 0.7]),
                        row("llm", "llm", 55)],
               "paired": [_paired("greedy", "maj8", 0.25, 0.20, 0.01), _paired("maj8", "llm", 0.2, 0.55, 1e-6),
                          _paired("greedy", "llm", 0.25, 0.55, 1e-7)]}
    text = rs.section(payload, ["greedy", "maj8", "takeover", "llm", "s2t-spec-tau10-b8"])
    assert "`greedy` < `maj8`: 25.0 % vs 20.0 %, McNemar p = 0.01 → reversed" in text
    assert "`maj8` < `s2t-spec-tau10-b8`: not measured" in text
    assert "Not run yet: `takeover`, `s2t-spec-tau10-b8`." in text
    assert "| 60/100 (50–70 %) |" in text  # pass@8 beside the majority vote
    assert "none (all cached)" in text
    payload["rows"][2]["last_computed"] = {"computed": 100, "wall_s": 1578.2, "tokens_per_s": 19.04,
                                           "date": "2026-12-01 20:44:20 UTC", "commit": "556b438"}
    assert "| none (all cached; computed 2026-12-01 at 556b438: 100 problems, 1,578 s, 19.0 tokens/s) |" in \
        rs.section(payload)
    payload["paired"][0] = _paired("greedy", "maj8", 0.25, 0.31, 0.2)
    assert "→ not shown: no significant difference" in rs.section(payload)
    payload["paired"][0] = _paired("greedy", "maj8", 0.25, 0.40, 0.001)
    assert "`greedy` < `maj8`: 25.0 % vs 40.0 %, McNemar p = 0.001 → holds" in rs.section(payload)


def test_readme_benchmark_section_is_the_committed_results_file():
    rs = _readme_section()
    results = ROOT / "bench" / "results" / "paper.json"
    assert rs.replace(README, rs.render(results, rs.paper_rows())) == README, \
        "regenerate it: python bench/readme_section.py"
