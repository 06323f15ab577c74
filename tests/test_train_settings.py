"""Trainer settings that config_checks does not know, refused by Lightning: one line naming the `trainer.*` key."""

import pytest

from gpt_lightning.common.errors import UserError
from gpt_lightning.train import build_trainer


@pytest.mark.parametrize("setting, value, says", [
    ("limit_val_batches", -1, "it has to be in [0.0, 1.0] or an int"),
    ("strategy", "foo", "invalid strategy name"),
    ("devices", "abc", "should be an int > 0"),
])
def test_a_value_lightning_refuses_is_one_line_naming_the_setting(setting, value, says):
    with pytest.raises(UserError) as e:
        build_trainer({"accelerator": "cpu", "max_steps": 5, setting: value}, logger=False)
    message = str(e.value)
    assert message.startswith(f"trainer.{setting}={value}: refused by lightning.Trainer: ") and says in message
    assert "\n" not in message and "trainer.max_steps" not in message


def test_good_settings_build_the_trainer():
    assert build_trainer({"accelerator": "cpu", "max_steps": 5}, logger=False).max_steps == 5
