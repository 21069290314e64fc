"""Dense CRF refinement of the cluster predictions (docs/cause.md §6), with the official settings."""
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import nullcontext
from functools import partial

import numpy as np
import pydensecrf.densecrf as dcrf
import torch
import torch.nn.functional as F
from pydensecrf.utils import unary_from_softmax

from errors import UserError
from loader.transforms import denormalize

GAUSSIAN_SXY, GAUSSIAN_COMPAT = 1, 3
BILATERAL_SXY, BILATERAL_SRGB, BILATERAL_COMPAT = 67, 3, 4


def crf_image(image):
    """The 8-bit image the official code gives the CRF: ×255, truncated, channels reversed.

    torchvision's to_pil_image casts float to uint8, which truncates toward zero and wraps
    out-of-range values modulo 256 (-1 -> 255, 256 -> 0) instead of clipping; the modulo is
    explicit here so the result does not depend on the platform's float-to-uint8 cast.
    """
    scaled = (denormalize(image.detach().float().cpu()) * 255).to(torch.int64) % 256
    return np.ascontiguousarray(scaled.to(torch.uint8).permute(1, 2, 0).numpy()[:, :, ::-1])


def crf_inputs(image, log_probs):
    """The torch half: the 8-bit BGR image and the class probabilities upsampled to its size."""
    bgr = crf_image(image)
    logits = F.interpolate(log_probs.detach().float().cpu()[None], size=bgr.shape[:2], mode="bilinear",
                           align_corners=False)[0]
    return bgr, F.softmax(logits, dim=0).numpy()


def _crf_inference(bgr, probs, max_iter):
    """The numpy/pydensecrf half, free of torch so that forked pool workers cannot hang on
    the OpenMP thread pool a parent's torch ops leave behind."""
    classes, height, width = probs.shape
    crf = dcrf.DenseCRF2D(width, height, classes)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=GAUSSIAN_SXY, compat=GAUSSIAN_COMPAT)
    crf.addPairwiseBilateral(sxy=BILATERAL_SXY, srgb=BILATERAL_SRGB, rgbim=bgr, compat=BILATERAL_COMPAT)
    return np.array(crf.inference(max_iter), dtype=np.float32).reshape(classes, height, width)


def crf_inference_job(inputs, max_iter=10):
    """CRF marginals [K,H,W] (numpy float32) of crf_inputs(image, log_probs): one job for a pool."""
    return _crf_inference(*inputs, max_iter)


def dense_crf_batch(images, log_probs, max_iter=10, pool=None):
    """[B,3,H,W], [B,K,h,w] -> [B,K,H,W] on the images' device; the CRF itself runs on CPU,
    across `pool` (a CrfPool) when one is given."""
    inputs = [crf_inputs(image, lp) for image, lp in zip(images, log_probs, strict=True)]
    job = partial(crf_inference_job, max_iter=max_iter)
    outputs = pool.map(job, inputs) if pool is not None else [job(pair) for pair in inputs]
    return torch.from_numpy(np.stack(outputs)).to(images.device)


class CrfWorkerDied(UserError):
    """A CRF worker process ended before its job was done: killed (the system's out-of-memory killer
    sends SIGKILL) or crashed. multiprocessing.Pool would wait for that job forever."""


class _Pending:
    """The results of jobs started on a CrfPool: ready() without waiting, get() waits for them all."""

    def __init__(self, futures, workers):
        self.futures, self.workers = futures, workers

    def ready(self):
        return all(future.done() for future in self.futures)

    def get(self):
        try:
            return [future.result() for future in self.futures]
        except BrokenProcessPool:
            raise CrfWorkerDied(f"a dense-CRF worker process (one of --crf_workers {self.workers}) died before "
                                f"its image was done: killed (the out-of-memory killer does so when memory runs "
                                f"out) or crashed; run the step again, with fewer --crf_workers if memory is "
                                f"short") from None


class _PendingOne(_Pending):
    def get(self):
        return super().get()[0]


class CrfPool:
    """Worker processes for the CRF jobs, used as multiprocessing.Pool's map, map_async and apply_async
    are, except that a worker that dies stops the work with CrfWorkerDied instead of leaving its job
    pending forever (concurrent.futures notices a dead worker; multiprocessing.Pool replaces it and
    loses the job). The jobs run the same functions either way, so the results are the same bits."""

    def __init__(self, workers):
        self.workers = workers
        self.executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
        # A fork-based executor forks all its workers at its first job: make that happen now (crf_pool).
        self.executor.submit(int).result()

    def apply_async(self, function, args=()):
        return _PendingOne([self.executor.submit(function, *args)], self.workers)

    def map_async(self, function, iterable):
        return _Pending([self.executor.submit(function, item) for item in iterable], self.workers)

    def map(self, function, iterable):
        return self.map_async(function, iterable).get()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.executor.shutdown(wait=True, cancel_futures=True)


def crf_pool(workers):
    """A CrfPool of `workers` processes for dense_crf_batch, or a null context for one worker.

    Forked: create it before CUDA starts in this process where the process can (a child forked after
    CUDA started inherits a state it must not touch); the workers run numpy and pydensecrf only, so,
    like a DataLoader's forked workers, they never touch a CUDA context the parent already holds.
    """
    if workers <= 1:
        return nullcontext()
    return CrfPool(workers)
