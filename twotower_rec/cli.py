"""Command line: one thin function per verb over the Python API (``api.py``): parse, call, print.

    twotower-rec download  --dataset movielens-1m --data-dir data
    twotower-rec prepare   --config configs/demo.yaml
    twotower-rec train     --config configs/demo.yaml [--set train.epochs=5]
    twotower-rec evaluate  --config configs/demo.yaml
    twotower-rec export    --config configs/demo.yaml
    twotower-rec recommend --export runs/demo/export --user 42 -k 10

Any verb runs under ``torchrun --nproc_per_node=N -m twotower_rec ...`` too. Heavy imports
(torch, TorchRec) happen inside the verbs, so ``--help`` is instant and ``recommend`` loads
only the export and the serving code.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from twotower_rec.errors import TwoTowerError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C

DESCRIPTION = """\
Train two-tower retrieval models on TorchRec.

The main job runs the verbs in order on one config:
  prepare -> train -> evaluate -> export -> recommend

Every verb that takes --config also takes --set KEY=VALUE (repeatable) to override a
config value, e.g. --set train.batch_size=2048 --set model.mlp_dims=[256,128].
Run `twotower-rec VERB --help` for a verb's options.
"""

TRAIN_DESCRIPTION = """\
Train the two-tower model with in-batch negatives on data.cache_dir. Writes train.out_dir/checkpoint
(best on validation), train.out_dir/last (resumable: every train.checkpoint_every_steps and at the
end) and train_metrics.json. Runs as one process, or as N under `torchrun --nproc_per_node=N -m
twotower_rec train ...` (gloo on CPU, nccl on CUDA); the result does not depend on N. With
model.members=K > 1, K such runs go to train.out_dir/member0..K-1 (seeds train.seed + k) and
train.out_dir/checkpoint holds their best weights side by side.
"""

EXPORT_DESCRIPTION = """\
Export what serving needs from a checkpoint, atomically: item embeddings (export.dtype) with raw ids
and metadata, a faiss index (export.ann) whose recall against exact search is measured and written
to manifest.json, the TorchScript query tower, users and vocabularies. Under torchrun the sharded
tables are gathered and rank 0 writes. twotower_rec/export/__init__.py describes every file and the
query tower's signature.
"""


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", metavar="YAML", help="config file (defaults are used without one)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. train.batch_size=2048 (repeatable)")


class Interrupted(Exception):
    """Ctrl-C (SIGINT) ended the verb; the message says how to go on."""


def _config(args):
    from twotower_rec.config import load_config

    return load_config(args.config, args.overrides)


def cmd_prepare(args) -> int:
    from twotower_rec.api import prepare

    for flag, key in (("dataset", "data.source"), ("data_dir", "data.data_dir"), ("on_bad_rows", "data.on_bad_rows")):
        if getattr(args, flag) is not None:
            args.overrides.append(f"{key}={getattr(args, flag)}")
    print(json.dumps(prepare(_config(args)).summary()))
    return 0


def cmd_download(args) -> int:
    from twotower_rec.data.download import download

    folder = download(args.dataset, args.data_dir, timeout=args.timeout)
    print(f"twotower-rec prepare --dataset {args.dataset} --data-dir {folder}")
    return 0


def cmd_train(args) -> int:
    from twotower_rec.api import train

    resume = False if args.resume is None else (args.resume or True)
    cfg = _config(args)
    try:
        train(cfg, resume=resume)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; the same `train` command with --resume continues from the last "
                          f"checkpoint in {cfg.train.out_dir} (train.checkpoint_every_steps sets how often one "
                          "is saved)") from None
    return 0


def cmd_evaluate(args) -> int:
    from twotower_rec.api import evaluate

    result = evaluate(_config(args), checkpoint=args.checkpoint, baselines=args.baselines, save_topk=args.save_topk,
                      output=args.output)
    if result is not None:  # rank 0
        print(result.report())
        print(f"metrics written to {result.path}")
        if result.topk_path is not None:
            print(f"ranked lists written to {result.topk_path}")
    return 0


def cmd_export(args) -> int:
    from twotower_rec.api import export

    export(_config(args), checkpoint=args.checkpoint, out=args.out)
    return 0


def cmd_recommend(args) -> int:
    from twotower_rec.serving.exported import ExportedModel  # the serving code alone (no TorchRec)

    if (args.user is None) == (args.liked is None and not args.feature):
        raise TwoTowerError("give --user ID (a known user), or --liked ID,ID,... and/or --feature NAME=VALUE "
                            "(a new user), not both")
    model = ExportedModel.load(args.export)
    if args.user is not None:
        who = args.user
        recs = model.recommend_user(args.user, k=args.k, exclude_seen=not args.include_seen, ann=args.ann)
    else:
        features = {}
        for item in args.feature:
            name, sep, value = item.partition("=")
            if not sep:
                raise TwoTowerError(f"--feature {item}: expected NAME=VALUE")
            features[name] = value
        liked = [x for x in (args.liked or "").split(",") if x]
        who = "new user"
        recs = model.recommend_new_user(liked=liked, features=features, k=args.k,
                                        exclude_liked=not args.include_seen, ann=args.ann)
        unknown = model.unknown_items(liked)
        if unknown:
            print(f"warning: not in the catalog, left out: {', '.join(unknown)}", file=sys.stderr)
        unknown_features = model.unknown_features(features)
        for name, value in unknown_features.items():
            print(f"warning: unknown value of {name}, read as unknown: {value} (vocabularies.json lists the known "
                  "ones)", file=sys.stderr)
    if args.json:
        payload = {"user": who, "items": [r.to_dict() for r in recs]}
        if args.user is None:
            payload["unknown_liked"] = unknown
            payload["unknown_features"] = unknown_features
        print(json.dumps(payload))
        return 0
    print(f"top {len(recs)} items for user {who}:" if args.user is not None
          else f"top {len(recs)} items for a new user:")
    for rank, rec in enumerate(recs, 1):
        title = f"  {rec.title}" if rec.title else ""
        print(f"{rank:>3}. {rec.item:<12} {rec.score:+.4f}{title}")
    return 0


def cmd_serve(args) -> int:
    from twotower_rec.serving.exported import ExportedModel
    from twotower_rec.serving.http_server import serve

    serve(ExportedModel.load(args.export), args.host, args.port, ann=args.ann, max_k=args.max_k,
          threads=args.threads, read_timeout=args.timeout, max_connections=args.max_connections)
    return 0


def _verb(verbs, name: str, func, config: bool = True, **kwargs) -> argparse.ArgumentParser:
    """A verb's parser (``help``, ``description``, ... in ``kwargs``) that runs ``func``;
    with ``config`` it takes ``--config`` and ``--set``."""
    p = verbs.add_parser(name, **kwargs)
    if config:
        _add_config_args(p)
    p.set_defaults(func=func)
    return p


def _add_checkpoint_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="checkpoint directory (default: train.out_dir/checkpoint)")


def _add_export_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--export", required=True, help="export directory written by `twotower-rec export`")


def _add_prepare(verbs) -> None:
    p = _verb(verbs, "prepare", cmd_prepare,
              help="read raw data, split it, build vocabularies, write the columnar cache",
              description="Read the source named by data.source, sort each user's events by time, "
                          "split leave-last-out, build vocabularies on training rows and write "
                          "data.cache_dir (npy columns + feature_spec.json).")
    p.add_argument("--dataset", help="same as --set data.source=...: synthetic, interactions, movielens-100k, "
                                     "movielens-1m, movielens-latest-small, movielens-20m, movielens-25m, "
                                     "movielens-32m")
    p.add_argument("--data-dir", help="same as --set data.data_dir=...: the unpacked MovieLens archive")
    p.add_argument("--on-bad-rows", choices=["error", "skip"],
                   help="malformed rows: stop naming file and line (error, the default) or count and drop them")


def _add_download(verbs) -> None:
    p = _verb(verbs, "download", cmd_download, config=False,
              help="fetch a MovieLens archive, check its MD5, unpack it",
              description="Download an official MovieLens archive, check it against the MD5 "
                          "GroupLens publishes beside it, and unpack it under --data-dir. "
                          "Prints the prepare command to run next.")
    p.add_argument("--dataset", required=True, choices=["movielens-100k", "movielens-1m", "movielens-latest-small",
                                                         "movielens-20m", "movielens-25m", "movielens-32m"])
    p.add_argument("--data-dir", default="data", help="where to unpack (default: ./data)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the server (default 30)")


def _add_train(verbs) -> None:
    p = _verb(verbs, "train", cmd_train, help="train on the prepared cache; writes a checkpoint",
              description=TRAIN_DESCRIPTION)
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                   help="continue from train.out_dir/last (or the CHECKPOINT given): weights, optimizer state, "
                        "step, data position and RNG; the world size may differ from the run that wrote it. "
                        "An ensemble (model.members > 1) keeps its finished members and continues the others")


def _add_evaluate(verbs) -> None:
    p = _verb(verbs, "evaluate", cmd_evaluate, help="full-catalog top-K metrics of a checkpoint beside most-popular",
              description="Rank the whole catalog for every user of eval.split (test by default) "
                          "and report Recall/HR/NDCG@K and MRR for the model and most-popular.")
    _add_checkpoint_arg(p)
    p.add_argument("--output", help="metrics JSON path (default: train.out_dir/eval_<split>.json)")
    p.add_argument("--baselines", action="store_true",
                   help="also rank with item-kNN, EASE and a last-items transition model (most-popular is always "
                        "shown); eval.ease_lambda, eval.transition_last, eval.transition_decay tune them")
    p.add_argument("--save-topk", metavar="PATH",
                   help="also write each user's top max(eval.ks) raw item ids and held-out item (.npz or .parquet)")


def _add_export(verbs) -> None:
    p = _verb(verbs, "export", cmd_export,
              help="write item embeddings, ANN index, scripted query tower, users and manifest",
              description=EXPORT_DESCRIPTION)
    _add_checkpoint_arg(p)
    p.add_argument("--out", help="export directory (default: export.dir)")


def _add_recommend(verbs) -> None:
    p = _verb(verbs, "recommend", cmd_recommend, config=False,
              help="top-K items for a known or a new user, from an export alone",
              description="Load an export directory (no training code, no TorchRec) and print "
                          "the top items for a known user (--user), or for a new user from the "
                          "items they liked and their side features (--liked, --feature), with "
                          "titles where known.",
              epilog="examples:\n  twotower-rec recommend --export runs/demo/export --user 42\n"
                     "  twotower-rec recommend --export runs/demo/export --liked 1,50,260 "
                     "--feature gender=F --json",
              formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_export_arg(p)
    p.add_argument("--user", help="raw user id of a known user, as in the source data")
    p.add_argument("--liked", metavar="ID,ID,...", help="new user: raw ids of items they liked, oldest first")
    p.add_argument("--feature", action="append", default=[], metavar="NAME=VALUE",
                   help="new user: a side feature, valued as in the export's vocabularies.json (repeatable)")
    p.add_argument("-k", type=int, default=10, help="number of items (default 10)")
    p.add_argument("--include-seen", action="store_true", help="do not filter items the user already saw or liked")
    p.add_argument("--ann", action="store_true", help="search the export's ANN index instead of the exact scan")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _port(text: str) -> int:
    """argparse type: a TCP port, 0 to 65535 (0: a free one)."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port: give 0 to 65535 (0 picks a free one)")
    return port


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _seconds(text: str) -> float:
    """argparse type: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text}")
    return value


def _add_serve(verbs) -> None:
    p = _verb(verbs, "serve", cmd_serve, config=False, help="HTTP JSON endpoint over an export: /health, /recommend",
              description="Serve an export directory over HTTP (standard library server, one "
                          "thread per connection). GET /health; POST /recommend with a JSON body: "
                          '{"user": "42", "k": 10} (known user), {"users": ["42", "7"], "k": 10} '
                          '(batch), or {"liked": ["1", "50"], "features": {"gender": "F"}} (new '
                          'user); optional "include_seen": true. Bad requests get a 4xx status '
                          'and {"error": message}.')
    _add_export_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--ann", action="store_true", help="answer from the ANN index instead of the exact scan")
    p.add_argument("--max-k", type=_positive_int, default=1000, help="largest k a request may ask for (default 1000)")
    p.add_argument("--threads", type=_positive_int, default=1, help="torch threads of the server process (default 1)")
    p.add_argument("--timeout", type=_seconds, default=10.0, metavar="SECONDS",
                   help="read timeout of a connection: an idle one, or a request whose bytes stop coming, is closed "
                        "after it (default 10)")
    p.add_argument("--max-connections", type=_positive_int, default=64, metavar="N",
                   help="connections served at once, one thread each; more get 503 at once (default 64)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twotower-rec", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for add_verb in (_add_prepare, _add_download, _add_train, _add_evaluate, _add_export, _add_recommend, _add_serve):
        add_verb(verbs)
    return parser


def quiet_library_warnings() -> None:
    """Hide deprecation notices addressed to TorchRec's and PyTorch's own developers.

    They repeat on every start and name internals a user cannot change; our own warnings
    and every error still show.
    """
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch(rec)?\.")
    warnings.filterwarnings("ignore", message=r".*deprecating ShardedTensor.*", category=FutureWarning)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    from twotower_rec.distributed.threads import limit_spinning

    limit_spinning()  # before any verb imports torch
    code = _run(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _leave(code)
    return code


def _leave(code: int) -> None:
    """End a process of a multi-process job (torchrun) once its verb has returned: flush and
    exit through ``os._exit``, without the interpreter's C++ teardown. About one 2-process
    ``export`` in 30 aborted there with "terminate called without an active exception" (no
    Python frame left), after its work was done and its process group destroyed."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that left, or a closed stream
            pass
    os._exit(code)


def _show_config_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """A :class:`ConfigWarning` as one ``warning:`` line on stderr (rank 0 only); others as Python shows them."""
    from twotower_rec.errors import ConfigWarning

    if not issubclass(category, ConfigWarning):
        return _default(message, category, filename, lineno, file, line)
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    quiet_library_warnings()
    warnings.showwarning = _show_config_warning
    try:
        return args.func(args)
    except TwoTowerError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except FileNotFoundError as err:
        print(f"error: file not found: {err.filename or err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:
        # The reader of our output left early (`recommend ... | head`): not an error. Point
        # stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:  # a full disk, a read-only folder, a path through a regular file
        where = " -> ".join(str(name) for name in (err.filename, err.filename2) if name is not None)
        print(f"error: {err.strerror or err}{': ' + where if where else ''}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Interrupted as err:
        print(str(err), file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
