"""Speed options for a network: channels-last memory format and ``torch.compile`` with an eager fallback.

Both are off by default and change no numbers beyond floating-point rounding. Use them on the network the
engines run, not on the one that is checkpointed (the wrapper keeps the state-dict keys anyway)::

    network = accelerate(network_def.to(device), compile=True, channels_last=True)
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from monai.data import MetaTensor
from torch import nn

__all__ = ["accelerate", "CompiledModule", "channels_last_format", "compile_unavailable_reason"]

# ours, not the engines' own ``compile=True``: that has no eager fallback when compilation fails (e.g. no C++
# compiler for inductor on CPU), and the instance optimisation and DownsampledNetwork call the network outside it


def compile_unavailable_reason() -> str | None:
    """Why ``torch.compile`` cannot be used here, or ``None`` when it is available."""
    if not callable(getattr(torch, "compile", None)):
        return f"torch {torch.__version__} has no torch.compile"
    return None


def channels_last_format(network: nn.Module) -> torch.memory_format:
    """``torch.channels_last_3d`` for a network with 3D convolutions (5-D weights), ``torch.channels_last`` for 2D.

    Raises:
        ValueError: the network has no 4-D or 5-D weights (nothing would change).
    """
    ndims = {p.ndim for p in network.parameters()}
    if 5 in ndims:
        return torch.channels_last_3d
    if 4 in ndims:
        return torch.channels_last
    raise ValueError(
        f"channels_last needs a network with 2D or 3D convolutions; {type(network).__name__} has no 4-D or 5-D weights."
    )


def _strip_meta(value: Any) -> Any:
    """Plain tensors for MetaTensors (Dynamo graph-breaks on MetaTensor's ``__torch_function__``)."""
    return value.as_tensor() if isinstance(value, MetaTensor) else value


def _restore_meta(value: Any, like: MetaTensor | None) -> Any:
    """Give tensor outputs the meta of the first MetaTensor input, as the eager network would."""
    if like is None:
        return value
    if isinstance(value, torch.Tensor) and not isinstance(value, MetaTensor):
        return MetaTensor(value, meta=like.meta, applied_operations=like.applied_operations)
    if isinstance(value, Mapping):
        return type(value)((k, _restore_meta(v, like)) for k, v in value.items())
    if isinstance(value, (tuple, list)):
        return type(value)(_restore_meta(v, like) for v in value)
    return value


def _summary(error: Exception, max_lines: int = 2) -> str:
    """``Type: message`` from the first lines of an error (the compiler's messages end with long hints)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join([f"{type(error).__name__}:", *lines[:max_lines]])


class CompiledModule(nn.Module):
    """``torch.compile(module)`` that falls back to the eager module, with a warning, when compiling fails.

    Compilation happens on the first call (and again for a new input shape); if the compiled call raises and
    the eager module then succeeds on the same input, the failure came from the compiler: a ``RuntimeWarning``
    says why, ``fallback_reason`` keeps it, and every later call runs eagerly. If the eager module raises
    too, its own error is raised (a bad input is not mistaken for a compiler failure).

    The wrapper is transparent: same parameters, the wrapped module's state-dict keys (no ``module.`` or
    ``_orig_mod.`` prefix, so checkpoints load into either), and attribute access falls through to it
    (``size_divisor``, ``predict``, ...; methods other than ``forward`` run eagerly). MetaTensor inputs are
    passed to the compiled graph as plain tensors and tensor outputs get the first MetaTensor input's meta.

    Args:
        module: the network.
        compile_kwargs: passed to ``torch.compile`` (e.g. ``mode="max-autotune"``, ``backend="eager"``).

    Raises:
        RuntimeError: ``torch.compile`` is unavailable (see :func:`compile_unavailable_reason`).
    """

    def __init__(self, module: nn.Module, **compile_kwargs: Any) -> None:
        super().__init__()
        reason = compile_unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
        self.module = module
        self.fallback_reason: str | None = None
        # not registered as a submodule: it holds the same parameters as ``module``
        object.__setattr__(self, "_compiled", torch.compile(module, **compile_kwargs))
        self.register_load_state_dict_pre_hook(self._add_module_prefix)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module" or "module" not in self.__dict__.get("_modules", {}):
                raise
            return getattr(self._modules["module"], name)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The wrapped module's state dict (same keys; a parent module calls this with its prefix)."""
        return self.module.state_dict(*args, **kwargs)

    @staticmethod
    def _add_module_prefix(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        # keys come without "module." (see state_dict); the loader walks self._modules, which has it
        for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "module.")]:
            state_dict[prefix + "module." + key[len(prefix) :]] = state_dict.pop(key)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.fallback_reason is not None:
            return self.module(*args, **kwargs)
        like = next((v for v in (*args, *kwargs.values()) if isinstance(v, MetaTensor)), None)
        plain_args = [_strip_meta(a) for a in args]
        plain_kwargs = {k: _strip_meta(v) for k, v in kwargs.items()}
        try:
            return _restore_meta(self._compiled(*plain_args, **plain_kwargs), like)
        except Exception as e:  # the compiler stack raises many types (BackendCompilerFailed, InductorError, ...)
            error = e
        out = self.module(*plain_args, **plain_kwargs)  # a genuinely bad input raises here, from the eager module
        self.fallback_reason = _summary(error)
        warnings.warn(
            f"torch.compile of {type(self.module).__name__} failed ({self.fallback_reason}); running it eagerly.",
            RuntimeWarning,
            stacklevel=2,
        )
        return _restore_meta(out, like)


def accelerate(
    network: nn.Module,
    compile: bool = False,
    channels_last: bool = False,
    compile_kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Apply the speed options to ``network`` and return the network to run.

    Args:
        network: the network, already on its device.
        compile: wrap it in :class:`CompiledModule` (``torch.compile`` with an eager fallback). When
            ``torch.compile`` is unavailable or ``torch.compile(...)`` itself raises, a ``RuntimeWarning`` is
            issued and the network is returned unwrapped.
        channels_last: convert its convolution weights, in place, to ``torch.channels_last_3d`` (3D) or
            ``torch.channels_last`` (2D); on a GPU, cuDNN convolutions then produce channels-last outputs,
            which run faster with mixed precision on tensor cores (CPU 3D convolutions in torch 2.13 ignore
            it and return contiguous outputs).
        compile_kwargs: passed to ``torch.compile``.

    Returns:
        ``network`` itself (``compile=False``) or a :class:`CompiledModule` around it.

    Raises:
        TypeError: ``network`` is not an ``nn.Module``.
        ValueError: ``channels_last`` for a network without 2D/3D convolution weights.
    """
    if not isinstance(network, nn.Module):
        raise TypeError(f"network must be a torch.nn.Module, got {type(network).__name__}.")
    if channels_last:
        network = network.to(memory_format=channels_last_format(network))
    if not compile:
        return network
    try:
        return CompiledModule(network, **dict(compile_kwargs or {}))
    except Exception as e:  # unavailable, or rejected by torch.compile (e.g. an unsupported Python version)
        warnings.warn(f"torch.compile is not used ({type(e).__name__}: {e}); running eagerly.", RuntimeWarning, stacklevel=2)
        return network
