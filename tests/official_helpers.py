"""What the official STEGO and HP code computes that the project's steps never ask for, read from a loaded
model or object: HP's EMA code, each method's own log-probabilities and predictions (with or without its
CRF) of whole images, and the head sizes of a loaded STEGO or HP object. No test lives here."""
from modules.crf import dense_crf_batch
from models.released import NAMES, SotaFileError, _read_sizes, _sota_state, describe, identify


def ema_code(model, images):
    """HP's EMA code [B, d, h, w] of a SotaModel (`net(x)[2]`, before HP's own dropout of it, which eval mode
    leaves out); neither HP's evaluation nor PriMaPs uses it."""
    head = model.head
    if head.ema_model1 is None:
        raise ValueError("this code head has no EMA branches (only HP files hold them)")
    return head._project(head.ema_model1, head.ema_model2, model.features(images), None)


def eval_log_probs(model, images):
    """A SotaModel's linear and cluster probes' log-probabilities at the images' size, by the method's own
    evaluation."""
    return model.log_probs_of(model.eval_patch_code(images), images.shape[-2:])


def eval_predictions(model, images, crf=True):
    """{'cluster', 'linear'}: [B, H, W] int64 predictions of a SotaModel, after the dense CRF (fed the
    log-probabilities; the CRF upsamples them to the image size) or without it (their arg-max, which
    is the arg-max of the linear logits and of the cosines, as HP's is_crf=False branch)."""
    log_probs = eval_log_probs(model, images)
    if not crf:
        return {"cluster": log_probs.cluster.argmax(dim=1), "linear": log_probs.linear.argmax(dim=1)}
    return {name: dense_crf_batch(images, getattr(log_probs, name)).argmax(dim=1) for name in ("cluster", "linear")}


def head_sizes(obj):
    """The `HeadSizes` of a loaded STEGO or HP object, read from its tensors alone."""
    family = identify(obj)
    if family not in ("stego", "hp"):
        raise SotaFileError(f"expected a STEGO or HP checkpoint, got {describe(obj)}")
    return _read_sizes(_sota_state(obj, family)[0], family, NAMES[family])
