"""Tools around the round, not steps of it: :mod:`.engine_runs` (one vLLM engine or OpenAI server per
job, for the demo, the benchmarks and the tests), :mod:`.demo` (the main job), :mod:`.toy` (a toy
target with known conditionals), :mod:`.targets` (the real target, from a package) and
:mod:`.train` (the DFlash drafter trainer)."""
