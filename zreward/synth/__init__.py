"""The embedded default: a synthetic rubric world (see zreward.synth.world)."""
