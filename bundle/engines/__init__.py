from .checkpoints import (
    AtomicCheckpointSaver, AtomicDiskSaver, ResumeFromLatest, latest_checkpoint, load_checkpoint, load_weights,
)
from .prepare_batch import RegistrationPrepareBatch
from .scores import key_metric_score
from .acceleration import CompiledModule, accelerate, channels_last_format, compile_unavailable_reason
from .instance_optimisation import InstanceOptimisationInferer
from .progress import PairProgressHandler
from .training import (
    AutocastInferer, GradientClipping, NonFiniteLossGuard, ReproducibleEpochs, ResumableEarlyStopHandler, TrainingLog,
    freeze_parameters, hardware_description, read_training_log, set_threads,
)
from .architecture_search import ArchitectureSearchStep
