"""Scorers and task suites. A fitness (`TaskFitness`, or the user's own function) scores a model handle
(`fitness.hf.HFHandle`, `fitness.vllm_handle.VLLMHandle`, `fitness.api.APIHandle`,
`fitness.state_dict.StateDictHandle`) into named objectives and per-example scores.

Importing this package stays light: back ends (torch, vLLM, httpx) load with their own modules."""
from evomerge.fitness.base import Fitness, FitnessResult
from evomerge.fitness.handle import ModelHandle, TokenScores
from evomerge.fitness.suite import TaskFitness
from evomerge.fitness.tasks import Task, TaskSpec, load_task

__all__ = ["Fitness", "FitnessResult", "ModelHandle", "TaskFitness", "Task", "TaskSpec", "TokenScores", "load_task"]
