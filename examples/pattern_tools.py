"""Tools on the default model: the model writes arithmetic or Python, a tool evaluates it.

The model (SmolLM2-135M-Instruct) is asked for

- an arithmetic expression for a word problem, which ``calculator`` evaluates (by walking the
  expression's syntax tree: nothing is run as code), and
- one line of Python, which ``python_tool`` runs in a sandboxed subprocess (time, memory and
  output limits, no network, no environment).

Whatever the tool refuses or what fails in it (not arithmetic, an exception, a timeout) is a
*tool error*: that trace gets weight zero and the run goes on. The tables show each draw, what
the tool made of it, and the distribution of the tool's results over the traces that worked.

Run: .venv/bin/python examples/pattern_tools.py
"""

from __future__ import annotations

import lmcascade as lc
from lmcascade.errors import AllWeightsZeroError
from lmcascade.patterns.sandbox import calculator, python_tool

SAMPLES = 6
PROBLEM = "Tom has 3 boxes of 12 eggs and eats 5 eggs. How many eggs are left?"
TASK = "the sum of the squares of the numbers 1 to 5"


def run_and_show(title: str, program: lc.BoundProgram, text_site: str, tool_site: str) -> None:
    """Samples ``program``; prints one row per trace (what the model wrote, and the tool's
    result or error) and the distribution of the results that worked."""
    try:
        result = lc.infer(program, method="forward", num_samples=SAMPLES, seed=0)
        traces = result.traces
    except AllWeightsZeroError as err:  # every draw failed in the tool
        result, traces = None, err.traces
    print(f"\n{title}")
    print(f"  {'the model wrote':<56} {'the tool gave'}")
    prefix = "print(" if text_site == "code" else ""
    for trace in traces:
        written = prefix + trace[text_site].value
        site = trace[tool_site] if tool_site in trace else None
        if site is None:
            outcome = "(not run)"
        elif site.error is not None:
            why = str(site.error)  # a SandboxError of reason "exit" ends with the error line
            why = why.split(": ", 1)[-1] if getattr(site.error, "reason", "") == "exit" else why
            outcome = f"weight 0: {why[:50]}"
        else:
            outcome = repr(site.value)
        print(f"  {written[:54]!r:<56} {outcome}")
    failed = sum(tool_site in t and t[tool_site].error is not None for t in traces)
    print(f"  tool errors: {failed} of {len(traces)}")
    if result is None:
        print("  every draw failed: no result has positive probability")
    else:
        print(result.summary(top=3))


def main() -> None:
    lm = lc.models.load()

    @lc.program
    def arithmetic(problem: str):
        ask = f"{problem}\nWrite the arithmetic expression that computes the answer."
        text = yield lc.gen(
            "expression",
            lm,
            lm.chat(ask) + "Expression: ",  # the reply starts here
            max_tokens=12,
            stop="\n",
            temperature=0.8,
        )
        expression = text.split("=")[0]  # "3 * 12 = 36" -> "3 * 12"
        return (yield lc.call("calculator", calculator, expression))

    @lc.program
    def python_line(task: str):
        text = yield lc.gen(
            "code",
            lm,
            # the reply starts with a code block and print( so that the line prints its value
            lm.chat(f"Write one line of Python that prints {task}.") + "```python\nprint(",
            max_tokens=20,
            stop=["\n", "```"],
            temperature=0.8,
        )
        run = python_tool(timeout=2.0, memory_mb=256, max_output=1000)
        return (yield lc.call("python", run, "print(" + text)).strip()

    run_and_show(
        f"{PROBLEM}  (calculator; the answer is 31)",
        arithmetic(PROBLEM),
        "expression",
        "calculator",
    )
    run_and_show(
        f"Python that prints {TASK}  (sandbox; the answer is 55)",
        python_line(TASK),
        "code",
        "python",
    )


if __name__ == "__main__":
    main()
