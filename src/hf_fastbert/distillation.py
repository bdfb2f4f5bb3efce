"""FastBERT's self-distillation losses, shared by the trainers and the metrics: KL(teacher || student) per student for
classifiers, 1 - cosine to the final embedding per head for sentence embedding models."""

import torch
import torch.nn.functional as F


def branch_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """
    Per-sample KL(teacher || student) of every student.

    Args:
        student_logits: (B, L-1, C) logits of the students.
        teacher_logits: (B, C) logits of the teacher.
        temperature: softmax temperature of both; the result is multiplied by its square.

    Returns:
        (B, L-1) float32 KL divergences (nats).
    """
    student_log_probs = (student_logits.float() / temperature).log_softmax(dim=-1)  # (B, L-1, C)
    teacher_log_probs = (teacher_logits.float() / temperature).log_softmax(dim=-1)[:, None]  # (B, 1, C)
    kl = F.kl_div(student_log_probs, teacher_log_probs.expand_as(student_log_probs), log_target=True, reduction="none")
    return kl.sum(dim=-1) * temperature**2  # (B, L-1)


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    FastBERT's self-distillation loss: KL(teacher || student) averaged over the batch, summed over the students.

    Args:
        student_logits: (B, L-1, C) logits of the students (layers 1 .. L-1).
        teacher_logits: (B, C) logits of the teacher; treated as constants (detached).
        temperature: softmax temperature; the loss is scaled by its square (Hinton et al.) so gradients keep their
            size. The paper uses 1.

    Returns:
        `(loss, per_branch_kl)`: the scalar loss and the (L-1,) batch-mean KL of each student.

    Example:

    ```python
    >>> import torch
    >>> from hf_fastbert.distillation import distillation_loss

    >>> teacher = torch.tensor([[2.0, -1.0]])
    >>> loss, per_branch = distillation_loss(teacher[:, None].repeat(1, 3, 1), teacher)
    >>> float(loss), per_branch.tolist()
    (0.0, [0.0, 0.0, 0.0])
    ```"""
    if student_logits.ndim != 3 or teacher_logits.ndim != 2 or student_logits.shape[::2] != teacher_logits.shape:
        raise ValueError(
            "Expected student_logits (B, L-1, C) and teacher_logits (B, C), got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}."
        )
    per_branch_kl = branch_kl(student_logits, teacher_logits.detach(), temperature).mean(dim=0)  # (L-1,)
    return per_branch_kl.sum(), per_branch_kl


def embedding_distillation_loss(all_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Self-distillation of the embedding heads: 1 - cosine of each head's embedding to the final one, averaged over the
    batch, summed over the heads.

    Args:
        all_embeddings: (B, L, D) embeddings of the heads (layers 1 .. L-1), then the model's own (final) embedding,
            treated as a constant (detached).

    Returns:
        `(loss, per_head_distance)`: the scalar loss and the (L-1,) batch-mean 1 - cosine of each head.
    """
    if all_embeddings.ndim != 3 or all_embeddings.shape[1] < 2:
        raise ValueError(f"Expected all_embeddings (B, L >= 2, D), got {tuple(all_embeddings.shape)}.")
    heads, final = all_embeddings[:, :-1].float(), all_embeddings[:, -1:].detach().float()
    distance = 1.0 - F.cosine_similarity(heads, final, dim=-1)  # (B, L-1)
    per_head = distance.mean(dim=0)
    return per_head.sum(), per_head


__all__ = ["branch_kl", "distillation_loss", "embedding_distillation_loss"]
