"""Tools around the library: the ahead-of-time planner, benchmarks, checkpoint analysis, sweeps, scaling fits and
the chat session. They use the stages and the trainer; nothing below them imports a tool."""
