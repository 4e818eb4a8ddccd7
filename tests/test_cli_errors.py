"""What a user sees when something is wrong: exit status 2, one `error:` line, no traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def assert_user_error(result, *fragments: str) -> str:
    """Exit 2; stderr ends with exactly one one-line `error: ...` naming every fragment."""
    assert result.returncode == 2, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.describe()
    assert lines[-1] == errors[0], result.describe()  # the message is one line, and the last
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    return errors[0]


def prepare_interactions(cli, tmp_path: Path, csv_text: str | None, *extra: str, name: str = "events.csv"):
    path = tmp_path / name
    if csv_text is not None:
        path.write_text(csv_text)
    return cli("prepare", "--set", "data.source=interactions", "--set", f"data.interactions_path={path}",
                   "--set", f"data.cache_dir={tmp_path / 'cache'}", *extra, cwd=tmp_path), path


def test_missing_config_file(cli, tmp_path):
    path = tmp_path / "nope.yaml"
    result = cli("prepare", "--config", path, cwd=tmp_path)
    assert_user_error(result, str(path))


def test_unknown_config_key_in_file(cli, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"data:\n  cache_dir: {tmp_path / 'cache'}\ntrain:\n  batch_sise: 64\n")
    result = cli("train", "--config", path, cwd=tmp_path)
    assert_user_error(result, "train.batch_sise", "train.batch_size", str(path))


def test_unknown_override_key(cli, tmp_path):
    result = cli("prepare", "--set", "data.chache_dir=x", cwd=tmp_path)
    assert_user_error(result, "data.chache_dir", "data.cache_dir")


def test_bad_override_value_and_bad_choice(cli, tmp_path):
    assert_user_error(cli("train", "--set", "train.batch_size=abc", cwd=tmp_path), "train.batch_size", "abc")
    assert_user_error(cli("prepare", "--set", "data.source=synthetc", cwd=tmp_path), "data.source", "synthetic")


def test_missing_interactions_file(cli, tmp_path):
    result, path = prepare_interactions(cli, tmp_path, None)
    assert_user_error(result, str(path))
    assert not (tmp_path / "cache" / "feature_spec.json").exists()


def test_interactions_missing_a_column(cli, tmp_path):
    result, path = prepare_interactions(cli, tmp_path, "user,item\n1,10\n1,11\n1,12\n")
    assert_user_error(result, str(path), "timestamp")


def test_interactions_missing_a_renamed_column(cli, tmp_path):
    result, _ = prepare_interactions(cli, tmp_path, "user,item,timestamp\n1,10,1\n1,11,2\n1,12,3\n",
                                     "--set", "data.timestamp_column=when")
    assert_user_error(result, "'when'")


def test_interactions_header_only(cli, tmp_path):
    result, path = prepare_interactions(cli, tmp_path, "user,item,timestamp\n")
    message = assert_user_error(result, str(path))
    assert "no interaction rows" in message or "empty" in message


def test_interactions_empty_file(cli, tmp_path):
    result, path = prepare_interactions(cli, tmp_path, "")
    assert_user_error(result, str(path))


def test_non_numeric_timestamp_names_the_line(cli, tmp_path):
    text = "user,item,timestamp\n1,10,100\n1,11,101\n2,10,102\n2,12,yesterday\n2,13,104\n"
    result, path = prepare_interactions(cli, tmp_path, text)
    assert_user_error(result, str(path), "line 5", "yesterday")


def test_line_numbers_are_file_lines_even_after_a_blank_line(tmp_path):
    """The message says "line N": N must be the line of the file that holds the bad value."""
    from twotower_rec.config import load_config
    from twotower_rec.data.sources import load_raw
    from twotower_rec.errors import DataError

    path = tmp_path / "events.csv"
    path.write_text("user,item,timestamp\n1,10,100\n\n1,11,101\n1,12,abc\n")  # 'abc' is on line 5
    cfg = load_config(None, ["data.source=interactions", f"data.interactions_path={path}"])
    with pytest.raises(DataError) as info:
        load_raw(cfg.data)
    assert "line 5:" in str(info.value)


def test_evaluate_without_a_checkpoint(cli, tmp_path):
    result = cli("evaluate", "--set", f"data.cache_dir={tmp_path / 'data'}", "--set",
                     f"train.out_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert_user_error(result, str(tmp_path / "run" / "checkpoint"))


def test_unknown_user_at_recommend(cli, pipeline, tmp_path):
    result = cli("recommend", "--export", pipeline.export_dir, "--user", "no-such-user", cwd=tmp_path)
    assert_user_error(result, "no-such-user")


def test_non_positive_k_at_recommend(cli, pipeline, tmp_path):
    from twotower_rec.data.prepared import PreparedData

    user = str(PreparedData(pipeline.cache_dir).raw_user_ids[0])
    result = cli("recommend", "--export", pipeline.export_dir, "--user", user, "-k", "0", cwd=tmp_path)
    assert_user_error(result, "positive", "0")


def test_missing_export_directory(cli, tmp_path):
    path = tmp_path / "no-export"
    result = cli("recommend", "--export", path, "--user", "1", cwd=tmp_path)
    assert_user_error(result, str(path))


def test_truncated_export_is_refused(cli, pipeline, tmp_path):
    copy = tmp_path / "export"
    shutil.copytree(pipeline.export_dir, copy)
    (copy / "item_embeddings.npy").unlink()
    result = cli("recommend", "--export", copy, "--user", "1", cwd=tmp_path)
    assert_user_error(result, "item_embeddings.npy")
    assert (pipeline.export_dir / "item_embeddings.npy").is_file()  # the fixture's export is untouched


def _cli_command() -> list[str]:
    script = Path(sys.executable).with_name("twotower-rec")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "twotower_rec"]


@pytest.mark.parametrize("verb", [None, "train"])
def test_help(verb, tmp_path):
    argv = _cli_command() + ([verb] if verb else []) + ["--help"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    if verb is None:
        for name in ("prepare", "train", "evaluate", "export", "recommend"):
            assert name in proc.stdout
        assert "--set" in proc.stdout
    else:
        for option in ("--config", "--set", "KEY=VALUE"):
            assert option in proc.stdout


def test_no_verb_is_a_usage_error(cli, tmp_path):
    result = cli(cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "usage" in result.stderr.lower()


def test_resume_refuses_a_changed_model_and_a_missing_checkpoint(pipeline, cli, tmp_path):
    changed = cli("train", "--config", pipeline.config_path, "--resume", "--set", "model.embedding_dim=8",
                  cwd=pipeline.root)
    assert changed.returncode == 2, changed.describe()
    assert "model.embedding_dim was 16" in changed.stderr and "resume with the same value" in changed.stderr
    missing = cli("train", "--config", pipeline.config_path, "--resume", "--set", f"train.out_dir={tmp_path}",
                  cwd=pipeline.root)
    assert missing.returncode == 2, missing.describe()
    assert f"no checkpoint at {tmp_path / 'last'}" in missing.stderr


def test_fused_adam_for_tables_is_refused_on_cpu(pipeline, cli, tmp_path):
    result = cli("train", "--config", pipeline.config_path, "--set", "train.sparse_optimizer=adam",
                 "--set", f"train.out_dir={tmp_path}", cwd=pipeline.root)
    assert result.returncode == 2, result.describe()
    assert "CUDA only" in result.stderr and "Traceback" not in result.stderr


def test_recommend_into_a_closed_pipe_ends_quietly(pipeline, tmp_path):
    """`twotower-rec recommend ... | head -1`: the reader leaves early; no traceback, no error."""
    from twotower_rec.data.prepared import PreparedData

    user = str(PreparedData(pipeline.cache_dir).raw_user_ids[0])
    command = (f"{sys.executable} -m twotower_rec recommend --export {pipeline.export_dir} --user {user} -k 50 "
               "| head -c 1 > /dev/null; echo \"exit ${PIPESTATUS[0]}\"")
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.stdout.strip() == "exit 0"


class _Left(Exception):
    pass


@pytest.mark.parametrize("world_size", [None, "1", "2"])
def test_a_process_of_a_multi_process_job_leaves_without_the_interpreters_teardown(monkeypatch, tmp_path,
                                                                                    world_size):
    """About one 2-process `export` in 30 aborted after its work was done, in the interpreter's
    C++ teardown ("terminate called without an active exception", no Python frame left): a
    process of a multi-process job (torchrun's WORLD_SIZE > 1) flushes and leaves with its exit
    code through os._exit; a single process returns normally."""
    import os

    from twotower_rec import cli

    left = []

    def fake_exit(code):
        left.append(code)
        raise _Left

    monkeypatch.setattr(os, "_exit", fake_exit)
    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    argv = ["evaluate", "--config", str(tmp_path / "missing.yaml")]  # a user error: exit 2
    if world_size == "2":
        with pytest.raises(_Left):
            cli.main(argv)
        assert left == [cli.EXIT_USER_ERROR]
    else:
        assert cli.main(argv) == cli.EXIT_USER_ERROR and left == []


def test_ctrl_c_during_train_is_one_line_naming_resume_and_exit_130(pipeline, tmp_path):
    import os
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    argv = [sys.executable, "-m", "twotower_rec", "train", "--config", str(pipeline.config_path),
            "--set", f"train.out_dir={tmp_path / 'run'}", "--set", "train.epochs=10000",
            "--set", "train.checkpoint_every_steps=5"]
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err_file:
        proc = subprocess.Popen(argv, cwd=pipeline.root, env=env, stdout=subprocess.DEVNULL, stderr=err_file)
        try:
            deadline = time.monotonic() + 120
            while not (tmp_path / "run" / "last").is_dir() and time.monotonic() < deadline:  # it trains
                assert proc.poll() is None, err_path.read_text()
                time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
        finally:
            proc.kill()
    stderr = err_path.read_text()
    assert proc.returncode == 130, stderr
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr  # the run's own lines (device, plan), then one line
    assert "--resume" in lines[-1] and str(tmp_path / "run") in lines[-1], stderr
    assert not any("KeyboardInterrupt" in line for line in lines), stderr


def test_an_os_error_is_one_line_naming_the_file(cli, tmp_path):
    # A cache folder under a regular file: the OS refuses to make it (NotADirectoryError).
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = cli("prepare", "--set", f"data.cache_dir={blocker / 'cache'}", cwd=tmp_path)
    assert_user_error(result, str(blocker))
