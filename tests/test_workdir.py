"""fpipe.workdir: a workdir belongs to one config, and nothing a run wrote is lost."""
import json

import ml_collections
import pytest

from fpipe import workdir as workdir_lib


def config(lr):
    return ml_collections.ConfigDict({"optim": {"lr": lr}, "log_steps": 10})


def test_a_folder_with_run_outputs_but_no_config_is_refused_and_left_as_it_is(tmp_path):
    (tmp_path / "results.json").write_text('{"mine": 1}')
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(workdir_lib.WorkdirError, match="holds results.json, metrics.jsonl but no config.json"):
        with workdir_lib.claim(str(tmp_path), config(0.1)):
            pass
    assert (tmp_path / "results.json").read_text() == '{"mine": 1}' and not (tmp_path / "config.json").exists()


def test_a_config_whose_run_left_nothing_is_replaced_and_one_with_outputs_is_refused(tmp_path):
    with workdir_lib.claim(str(tmp_path), config(0.1)):
        pass  # the run failed at its start: only config.json was written
    with workdir_lib.claim(str(tmp_path), config(0.2)) as changes:
        assert changes == {}  # taken over, not a continuation of the other run
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["lr"] == 0.2
    (tmp_path / "metrics.jsonl").write_text('{"step": 5}\n')  # now it did work
    with pytest.raises(workdir_lib.WorkdirError, match=r"optim.lr: 0.2 -> 0.3.*--allow_change=optim.lr"):
        with workdir_lib.claim(str(tmp_path), config(0.3)):
            pass


def test_an_accepted_change_moves_the_earlier_results_aside(tmp_path):
    """results.json of the run before a change is that config's: a continuation stopped before its
    end must not leave it beside the new config.json, as if it were the new config's."""
    with workdir_lib.claim(str(tmp_path), config(0.1)):
        pass
    for name, text in (("results.json", '{"step": 4}'), ("results.md", "| 4 |"), ("results.png", "png")):
        (tmp_path / name).write_text(text)
    with workdir_lib.claim(str(tmp_path), config(0.1)) as changes:  # the same config: results stay
        assert changes == {}
    assert (tmp_path / "results.json").read_text() == '{"step": 4}'
    with workdir_lib.claim(str(tmp_path), config(0.2), allow_change=("optim.lr",)) as changes:
        assert changes == {"optim.lr": (0.1, 0.2)}
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "results.md").exists()
    assert (tmp_path / "results.superseded-1.json").read_text() == '{"step": 4}'
    assert (tmp_path / "results.superseded-1.md").read_text() == "| 4 |"
    assert (tmp_path / "results.superseded-1.png").read_text() == "png"
    (tmp_path / "results.json").write_text('{"step": 8}')  # the continuation finished; another change
    with workdir_lib.claim(str(tmp_path), config(0.3), allow_change=("optim.lr",)):
        pass
    assert (tmp_path / "results.superseded-2.json").read_text() == '{"step": 8}'
    assert (tmp_path / "results.superseded-1.json").read_text() == '{"step": 4}'


def test_a_key_added_by_a_newer_fpipe_at_the_config_files_value_is_no_change(tmp_path):
    """A workdir written before fpipe had a key: rerunning the same config file is accepted when the
    new key has the file's own value, refused when the command line set it to another."""
    with workdir_lib.claim(str(tmp_path), config(0.1)):
        pass
    (tmp_path / "metrics.jsonl").write_text('{"step": 5}\n')
    newer = config(0.1)
    newer.model = ml_collections.ConfigDict({"head_weights": {"path": "", "rename": ()}})
    with workdir_lib.claim(str(tmp_path), newer, file_config=newer) as changes:
        assert changes == {}
    (tmp_path / "config.json").write_text(json.dumps({"optim": {"lr": 0.1}, "log_steps": 10}))  # the old one
    overridden = config(0.1)
    overridden.model = ml_collections.ConfigDict({"head_weights": {"path": "heads.pth", "rename": ()}})
    with pytest.raises(workdir_lib.WorkdirError, match=r"model.head_weights.path: None -> 'heads.pth'"):
        with workdir_lib.claim(str(tmp_path), overridden, file_config=newer):
            pass
    with pytest.raises(workdir_lib.WorkdirError, match=r"model.head_weights.path"):  # no file config: as before
        with workdir_lib.claim(str(tmp_path), newer):
            pass
