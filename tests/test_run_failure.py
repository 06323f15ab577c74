"""A run that fails says so in its run record and its log; a finished run's record is never overwritten."""

import logging

from gpt_lightning.common.errors import UserError
from gpt_lightning.train import record_failure
from gpt_lightning.training.run_record import RunRecord


def raised(error):
    try:
        raise error
    except Exception as e:
        return e


def test_a_crash_is_recorded_with_its_traceback_in_the_log(tmp_path):
    handler = logging.FileHandler(tmp_path / "train.log")
    logging.getLogger().addHandler(handler)
    try:
        message = record_failure(tmp_path, raised(RuntimeError("boom")), to_log=True)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert message == "RuntimeError: boom"
    record = RunRecord.load(tmp_path / "summary.json")
    assert (record.kind, record.status, record.error) == ("train", "failed", "RuntimeError: boom")
    log = (tmp_path / "train.log").read_text()
    assert "error: RuntimeError: boom" in log and "Traceback" in log and "raise error" in log


def test_a_complete_record_is_kept_when_a_resume_of_it_fails(tmp_path):
    RunRecord(kind="train", status="complete", global_step=800).save(tmp_path / "summary.json")
    record_failure(tmp_path, UserError("trainer.max_steps=0 must be >= 1"), to_log=False)
    assert RunRecord.load(tmp_path / "summary.json").status == "complete"
    (tmp_path / "summary.json").write_text("{corrupt")
    record_failure(tmp_path, UserError("x"), to_log=False)
    assert (tmp_path / "summary.json").read_text() == "{corrupt"  # not ours to replace


def test_a_failed_record_is_replaced_by_the_next_failure(tmp_path):
    record_failure(tmp_path, UserError("first"), to_log=False)
    record_failure(tmp_path, UserError("second"), to_log=False)
    assert RunRecord.load(tmp_path / "summary.json").error == "second"
