from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from atedm_export.dsap import Schedule, keep_count, load_preset, parse_schedule, preset_names, stage_plan
from atedm_export.errors import PlanError, SpecError

PRESETS = ["dagger", "none", "paper", "uniform-63"]


def test_presets_are_shipped():
    assert preset_names() == PRESETS


@pytest.mark.parametrize("name", PRESETS)
def test_every_step_maps_to_exactly_one_stage(name):
    schedule = load_preset(name)
    for num_steps in list(range(1, 120)) + [250, 999, 1000]:
        ranges = schedule.step_ranges(num_steps)
        covered = [step for r in ranges for step in r]
        assert covered == list(range(num_steps)), (name, num_steps)
        for step in (0, num_steps // 2, num_steps - 1):
            assert step in ranges[schedule.stage_index(step, num_steps)]


def test_paper_schedule_prunes_more_later(tiny_blocks):
    early, main = load_preset("paper").stages
    early_plan, main_plan = stage_plan(early, tiny_blocks), stage_plan(main, tiny_blocks)
    unpruned = {b.name for b in tiny_blocks} - set(early_plan.keep)
    assert unpruned == {
        "down_blocks.1.attentions.0",
        "down_blocks.2.attentions.0",
        "up_blocks.0.attentions.2",
        "up_blocks.1.attentions.2",
    }
    assert set(main_plan.keep) == {b.name for b in tiny_blocks}
    assert load_preset("paper").step_ranges(50) == [range(0, 5), range(5, 50)]


def test_dagger_never_prunes_the_fine_level(tiny_blocks):
    fine = {b.name for b in tiny_blocks if b.tokens == max(x.tokens for x in tiny_blocks)}
    for stage in load_preset("dagger").stages:
        assert not fine & set(stage_plan(stage, tiny_blocks).keep)


def test_none_prunes_nothing(tiny_blocks):
    assert stage_plan(load_preset("none").stages[0], tiny_blocks).keep == {}


@pytest.mark.parametrize(("ratio", "tokens", "want"), [(0.37, 4096, 1516), (0.37, 1024, 379), (1.0, 64, 64), (0.001, 64, 1)])
def test_keep_count_rounds_ratio_times_tokens(ratio, tokens, want):
    assert keep_count(ratio, tokens) == want


def test_step_outside_the_run_is_refused():
    with pytest.raises(PlanError, match="step 20 is outside a run of 20 steps"):
        load_preset("paper").stage_index(20, 20)


def test_pattern_matching_no_block_is_refused(tiny_blocks):
    schedule = parse_schedule({"stages": [{"name": "s", "until": 1.0, "keep": 0.5, "blocks": {"down_block.1.*": 1.0}}]})
    with pytest.raises(PlanError, match="'down_block.1.\\*' matches no attention block"):
        stage_plan(schedule.stages[0], tiny_blocks)


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([{"name": "a", "until": 1.0, "keep": 0.0}], "stages.0.keep: Input should be greater than 0"),
        ([{"name": "a", "until": 1.0, "keep": 1.5}], "stages.0.keep: Input should be less than or equal to 1"),
        ([{"name": "a", "until": 1.0, "blocks": {"x": -1}}], "stages.0.blocks.x: Input should be greater than 0"),
        ([{"name": "a", "until": 0.5}], "must end at until: 1.0"),
        ([{"name": "a", "until": 0.6}, {"name": "b", "until": 0.4}], "must increase"),
        ([{"name": "a", "until": 1.0, "kep": 0.5}], "unknown key 'stages.0.kep'"),
    ],
)
def test_bad_schedules_are_refused_in_one_line(stages, message):
    with pytest.raises(SpecError, match=message) as info:
        parse_schedule({"stages": stages})
    assert "\n" not in str(info.value)


def test_unknown_preset_names_the_presets():
    with pytest.raises(SpecError, match="unknown schedule 'papr'; expected one of: dagger, none, paper, uniform-63"):
        load_preset("papr")


@pytest.mark.parametrize("name", PRESETS)
def test_schedule_is_a_plain_model(name):
    """A schedule travels as data: the manifest records it inline as JSON and the runtime and the server read
    it back, so it must come back equal and map every step to the same stage; and ``load_preset`` hands every
    caller the same cached object, so nobody may change it in place."""
    schedule = load_preset(name)
    again = Schedule.model_validate(json.loads(json.dumps(schedule.model_dump(mode="json"))))
    assert again == schedule and again is not schedule
    for num_steps in (1, 2, 7, 20, 50, 999):
        assert again.step_ranges(num_steps) == schedule.step_ranges(num_steps)
        assert [step for steps in again.step_ranges(num_steps) for step in steps] == list(range(num_steps))
        assert [again.stage_index(s, num_steps) for s in range(num_steps)] == \
            [i for i, steps in enumerate(schedule.step_ranges(num_steps)) for _ in steps]
    assert load_preset(name) is schedule
    with pytest.raises(ValidationError, match="frozen"):
        schedule.name = "changed"
    with pytest.raises(ValidationError, match="frozen"):
        schedule.stages[0].keep = 0.5
    assert Schedule.model_validate({**schedule.model_dump(), "name": "changed"}) != schedule
