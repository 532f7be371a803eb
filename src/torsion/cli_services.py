"""The ``torsion judge``, ``serve``, ``condition`` and ``review`` parsers (commands in
:mod:`torsion.commands_judge` and :mod:`torsion.commands`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from torsion import commands, commands_judge
from torsion.cli_types import (add_model_options, block_index, env_name, json_object, named_condition,
                               named_vector, nonempty_text, nonneg_float, output_path, port_int,
                               positive_float, positive_int, run_directory)


def add_service_parsers(subcommands: argparse._SubParsersAction) -> None:
    """Add the parsers; each sets ``func`` to its command."""
    judge = subcommands.add_parser(
        "judge", help="label responses (rules, learned, ensemble, probe or an OpenAI-compatible LLM), compare two "
        "labellings, re-judge a run, or retrain the learned or probe judge",
        description="`torsion judge IN.jsonl --out OUT.jsonl` adds label, score, judge and reasons to rows "
        "with 'prompt' and 'response'; rows already in OUT are skipped, so a killed run resumes. "
        "`torsion judge agree A.jsonl B.jsonl` prints confusion matrices, accuracy and Cohen's kappa (and "
        "per-source accuracy when rows have a 'source' field). "
        "`torsion judge rejudge RUN_DIR --judge probe` re-labels a run's responses, keeping the old labels in "
        "each row's 'previous' list and marking the stages that read labels as not done. "
        "`torsion judge train LABELLED.jsonl [--judge probe|learned] [--exclude-source S] [--out MODEL.json]` "
        "retrains the probe (the default) or the learned judge (default --out: the package's shipped weights). "
        "The LLM judge reads its API key from the environment variable named by --api-key-env; the key is "
        "never written anywhere.")
    judge.add_argument("input", type=nonempty_text, help="a JSONL file, or one of the words agree, rejudge, train")
    judge.add_argument("files", nargs="*", type=Path,
                       help="agree: the two labelled files; rejudge: the run directory; train: the labelled file")
    judge.add_argument("--out", type=output_path, default=None,
                       help="output JSONL (appended, resumable); with train, the model JSON to write")
    judge.add_argument("--judge", default="probe", choices=["rules", "learned", "ensemble", "probe", "llm"],
                       help="probe (the default: the embedded SmolLM2 reads each response and a probe labels it; the "
                       "most accurate on model families it never saw, about 0.1 s a response on a laptop CPU; "
                       "needs `torsion assets pull`), rules (offline and fast: 2,000 responses in about 2 s), "
                       "learned (n-grams and the rules' reasons), ensemble, or llm (an endpoint); with train, the "
                       "judge to retrain (probe or learned)")
    judge.add_argument("--weights", type=Path, default=None,
                       help="learned/ensemble/probe judge: a model JSON from `torsion judge train` (default: shipped)")
    judge.add_argument("--device", default="cpu", help="probe judge: where its reader model runs (cpu, cuda, cuda:N)")
    judge.add_argument("--exclude-source", action="append", default=[], metavar="SOURCE",
                       help="train: leave out the rows of this source (repeatable), e.g. to hold sources out")
    judge.add_argument("--llm-model", default=None, help="model name at the endpoint (llm judge)")
    judge.add_argument("--base-url", default=None, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    judge.add_argument("--api-key-env", default=None, help="environment variable holding the key (default OPENAI_API_KEY)")
    judge.add_argument("--samples", type=positive_int, default=None,
                       help="replies per item when --temperature > 0 (llm judge; at 0 one request is sent)")
    judge.add_argument("--temperature", type=nonneg_float, default=None,
                       help="sampling temperature (llm judge, default 0)")
    judge.add_argument("--max-workers", type=positive_int, default=None, help="concurrent requests (llm judge)")
    judge.add_argument("--cache", type=output_path, default=None, help="SQLite cache (default: next to --out)")
    judge.set_defaults(func=commands_judge.judge)

    serve = subcommands.add_parser(
        "serve", help="an OpenAI-compatible server with per-request steering, batching and streaming",
        description="Serves /v1/chat/completions, /v1/completions (stream: true as server-sent events), "
        "/v1/models, /health, and GET/POST /v1/steering. A request steers itself with the extension field "
        "steering = {method (flat, dense, ablation, weighted-ablation, ace, spline-a, spline-b or none), "
        "vector: NAME, layers, strength, scale, component, positions, beta, params, condition}; without it "
        "the --steering default applies. Requests are generated in batches, each row with its own "
        "steering: an idle server waits --batch-window-ms for more requests, and (continuous batching, the "
        "default) a request arriving while others decode joins them at the next decode step. Binds 127.0.0.1 by "
        "default; any other address needs --api-key-env.")
    add_model_options(serve, "embedded:qwen2.5-coder-0.5b")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=port_int, default=8000)
    serve.add_argument("--vector", type=named_vector, action="append", default=[], metavar="NAME=FILE:KEY",
                       help="register a vector for requests to name, e.g. refusal=runs/q/vectors.safetensors:md/resid "
                       "(KEY may be left out when the file holds one vector); repeatable")
    serve.add_argument("--method-file", type=named_condition, action="append", default=[], metavar="NAME=FILE",
                       help="register a saved steering method (e.g. ace, spline-a, spline-b; a spline's recorded "
                       "coherent t range bounds requests); repeatable")
    serve.add_argument("--condition", type=named_condition, action="append", default=[], metavar="NAME=FILE",
                       help="load a condition file from `torsion condition fit`; repeatable")
    serve.add_argument("--steering", type=json_object, default=None, metavar="JSON",
                       help="the default steering for requests without a steering field (default none)")
    serve.add_argument("--max-batch-size", type=positive_int, default=8,
                       help="most rows decoding at once (default 8)")
    serve.add_argument("--batch-window-ms", type=nonneg_float, default=20.0,
                       help="how long the first request reaching an idle server waits for others (default 20)")
    serve.add_argument("--batching", choices=["continuous", "static"], default="continuous",
                       help="continuous: a request joins the running batch at the next decode step; static: it "
                       "waits until the running batch has finished (default continuous)")
    serve.add_argument("--max-applied-norm", type=positive_float, default=None,
                       help="refuse additive steering whose ||alpha v_l|| exceeds this at any block (default no limit)")
    serve.add_argument("--api-key-env", default=None, type=env_name, metavar="NAME",
                       help="environment variable holding the API key every request must send as a Bearer "
                       "token; required off loopback; the key is never logged")
    serve.set_defaults(func=commands.serve)

    condition = subcommands.add_parser(
        "condition", help="fit a CAST condition (direction and threshold) on a run's train rows, or evaluate one",
        description="`torsion condition fit RUN_DIR --category C` writes a condition file: the direction c = "
        "mean(resid of C's train rows) - mean(the other train rows), normalised, at one block (default: the "
        "block with the best train balanced accuracy), and the threshold tau maximising balanced accuracy of "
        "x.c > tau on train rows. `torsion serve --condition NAME=FILE` gates steering with it. "
        "`torsion condition eval RUN_DIR --category C` measures conditional steering on the held-out harmful "
        "prompts: flat md/resid steering at the alpha and blocks of the strength search --study, applied where "
        "the condition (fit as above, or --condition FILE) fires; refusal and genuine-compliance rates with "
        "Wilson 95% intervals for C and for the other categories, unsteered, conditional and unconditional "
        "-> RUN_DIR/analysis/condition_<C>.json.")
    condition.add_argument("action", choices=["fit", "eval"])
    condition.add_argument("run_dir", type=run_directory, help="a directory made by `torsion run`")
    condition.add_argument("--category", required=True, type=nonempty_text, help="the category to steer")
    condition.add_argument("--layer", type=block_index, default=None, help="the block (default: best on train)")
    condition.add_argument("--out", type=output_path, default=None,
                           help="fit: condition file (default RUN_DIR/condition-<category>.safetensors); eval: "
                           "result JSON (default RUN_DIR/analysis/condition_<category>.json)")
    evaluation = condition.add_argument_group("eval only")
    evaluation.add_argument("--study", type=nonempty_text, default=None,
                            help="the strength search whose chosen alpha and blocks steer (default comply-global)")
    evaluation.add_argument("--condition", type=Path, default=None, metavar="FILE",
                            help="a condition file from `condition fit` (default: fit one now, as fit does)")
    evaluation.add_argument("--judge", default=None, choices=["rules", "llm"],
                            help="judge for the steered responses (default: the one that labelled the run)")
    add_model_options(evaluation)
    condition.set_defaults(func=commands.condition)

    review = subcommands.add_parser(
        "review", help="a local web page for the human check of every surviving comply",
        description="Shows each response the judge called a comply and false-positive correction kept, "
        "with the rules that fired; confirm (h) or override (n, r) with keys or buttons. Decisions go to "
        "RUN_DIR/review.jsonl and survive restarts; analysis/review.json holds the genuinely-harmful count. "
        "Binds 127.0.0.1; on any other address the URL carries a random access token.")
    review.add_argument("run_dir", type=run_directory, help="a directory made by `torsion run`")
    review.add_argument("--host", default="127.0.0.1")
    review.add_argument("--port", type=port_int, default=8765)
    review.set_defaults(func=commands.review)
