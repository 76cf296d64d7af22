import pytest

from ih_circuits import NGramTask


@pytest.fixture
def paper_task() -> NGramTask:
    """The paper's setting: d = 3, parents {1, 2}, T = 100 context tokens + 1 target, alpha = 0.1."""
    return NGramTask(vocab_size=3, parents=(1, 2), seq_len=101, alpha=0.1)


@pytest.fixture
def without_runtime_typecheck():
    """Run as a user does, without the jaxtyping import hook, so our own ValueErrors are what is raised.

    The test suite checks every annotated shape at run time (``--jaxtyping-packages``); a wrongly typed
    argument then fails with jaxtyping's TypeCheckError before the library's validation can speak.
    """
    import jaxtyping

    previous = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    yield
    jaxtyping.config.update("jaxtyping_disable", previous)
