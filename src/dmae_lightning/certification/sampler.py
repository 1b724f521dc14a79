"""The Monte Carlo engine: block-seeded noise, many images per forward batch, counts kept on the device.

A procedure (:mod:`.procedures`) asks for noisy samples of its image with :class:`~.protocol.Draw`
requests and receives the class counts; the sampler serves the requests of many images at once. The
sampler starts every procedure run itself, with the noise it draws from (``submit(idx, image, label,
procedure)``), and that noise is fixed when the sampler is built: the counts a radius is computed from
always come from the noise the radius is computed with.

Noise scheme (``NOISE_SCHEME``, recorded with every run): the samples of image ``idx`` in stage ``stage``
(e.g. CERTIFY's selection 0 and estimation 1) are the rows of consecutive blocks of ``NOISE_BLOCK``
samples, block ``b`` drawn whole from ``seeded_generator(seed, CERTIFY_STREAM, idx, stage, b)``. A
sample's noise is therefore a pure function of (seed, idx, stage, sample number): it depends neither on
``batch_size``, nor on which other images share a forward batch, nor on the number of ranks, nor on the
point where a run was resumed. The noise is drawn on the sampler's device: CPU and CUDA generators draw
different numbers, and CUDA's (Philox) assigns its numbers to elements by the kernel's launch grid, which
PyTorch caps by the GPU's number of SMs, so a block (more numbers than one wave of threads) differs between
GPUs of different SM counts too: results reproduce on the CPU and on the same GPU model, each equally valid.

Forward batches are filled from the pending requests in the order the images arrived, so batches stay
full when each image needs fewer samples than ``batch_size`` (CERTIFY's n0 = 100 selection draws, the
sequential test's looks). Counts and the non-finite-logit tallies stay on the device until a request is
complete: one host read-back per batch that completes requests (all of them at once), none otherwise.
With ``pipeline`` (the default on CUDA) that read-back is waited for only after the next batch has been
launched, from the requests already known, whenever they fill it: the device computes batch t+1 while
the host decides on batch t's requests. Only the packing of rows into batches changes, never a sample's
noise. A row's vote is the lowest class index among its exact maximal logits (:func:`top_class`), so an
exact tie (two bf16 logits rounded to one value) is resolved alike in every batch; the logits of a row are
computed in whatever batch it lands in, so on a GPU with bf16 or compiled kernels a near-tie can in rare
cases depend on the batch shape through the logit values themselves (every result stays a valid
certificate of the classifier as evaluated). With ``compile`` every forward pass has
the shape ``[batch_size, C, H, W]`` (a short last batch is padded, and the padding rows are not counted),
so one compiled graph serves the whole run.

An :class:`~.protocol.Attack` request is served at once, image by image (:meth:`Sampler.attack`): an L2 PGD on
the soft smoothed classifier with autograd, in float32 on the eager (uncompiled) classifier, its forward
passes ``samples`` rows each whatever ``batch_size``; its noise draws are the first ``samples`` samples of its
own stage (noisy copies of a zero image) and its other random numbers come from that stage's block
``ATTACK_BLOCK``, so the adversarial image too depends only on (seed, idx, stage). A
:class:`~.protocol.DrawAround` is served like any Draw, the noise added to its image.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time
from collections.abc import Iterator

import torch
from torch import nn

from dmae_lightning.certification.checks import check_precision
from dmae_lightning.certification.protocol import Attack, Draw, DrawAround, Procedure, Run
from dmae_lightning.certification.records import Record
from dmae_lightning.noise import Noise
from dmae_lightning.rng import CERTIFY_STREAM, seeded_generator

NOISE_BLOCK = 100  # samples per seeded noise block
NOISE_SCHEME = (
    f"block{NOISE_BLOCK}-v1"  # changes whenever the noise of a given (seed, idx, stage, sample) changes
)
AUTOCAST = {
    "32-true": None,
    "bf16-mixed": torch.bfloat16,
    "16-mixed": torch.float16,
}  # checks.PRECISION_NAMES
PIXEL_TOLERANCE = 1e-4  # images may leave [0,1] by this much through rounding in the data pipeline
ATTACK_BLOCK = 2**32  # the block key of an attack's own random numbers (random start, zero-gradient steps)


def resolve_precision(precision: str | None, device: torch.device | str) -> str:
    """``None``: bf16-mixed on CUDA, 32-true elsewhere (a CPU's bf16 is slow or emulated)."""
    check_precision(precision)
    if precision is None:
        return "bf16-mixed" if torch.device(device).type == "cuda" else "32-true"
    return precision


def check_image(x: torch.Tensor) -> torch.Tensor:
    """One [C,H,W] image of [0,1] pixels as float32 (a float64 image is cast; the noise is float32)."""
    if not isinstance(x, torch.Tensor) or x.ndim != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be one [C,H,W] image tensor, got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point image in [0,1], got dtype {x.dtype}")
    low, high = torch.stack(x.aminmax()).tolist()  # one read-back
    if not (low >= -PIXEL_TOLERANCE and high <= 1 + PIXEL_TOLERANCE):  # also rejects NaN
        raise ValueError(f"x must hold [0,1] pixels, got values in [{low}, {high}]")
    return x.float()


def top_class(logits: torch.Tensor) -> torch.Tensor:
    """The vote of each row of ``logits`` [R,K]: [R], the lowest class index among the row's exact maxima.

    Compared in float32 (exact for bf16 and fp16 logits), with the tie rule written out rather than left to
    ``argmax``: two classes whose logits are equal, e.g. two bf16 logits rounded to one value, give the lower
    class in every batch shape and on every device. (A row holding NaN votes K-1; its image is refused.)"""
    values = logits.float()
    classes = torch.arange(values.shape[1], device=values.device)  # [K]
    is_max = values == values.amax(dim=1, keepdim=True)  # [R,K]
    return torch.where(is_max, classes, values.shape[1] - 1).amin(dim=1)


class NonFiniteLogits(ValueError):
    """The base classifier returned NaN or Inf: a broken model must never be certified."""


class _Image:
    """An image in flight: its procedure run, its pending request and the device-side tallies."""

    def __init__(self, idx: int, image: torch.Tensor, run: Run, num_classes: int):
        self.idx, self.image, self.run = idx, image, run
        self.drawn: dict[int, int] = {}  # stage -> samples of its stream used so far
        self.cache: tuple[int, int, torch.Tensor] | None = (
            None  # (stage, block, noisy copies [NOISE_BLOCK,C,H,W]) in use
        )
        self.started = time.perf_counter()
        self._request: Draw | None = None  # set by the first ask() that does not finish the run
        self.assigned = 0  # rows of the request put into forward batches so far
        self.counts = torch.zeros(num_classes, dtype=torch.long, device=image.device)  # [K]
        self.nonfinite = torch.zeros((), dtype=torch.long, device=image.device)

    @property
    def request(self) -> Draw:
        """The pending request (every image in flight has one)."""
        if self._request is None:
            raise RuntimeError(f"image {self.idx}: its procedure run has not made a request yet")
        return self._request

    def ask(self, answer: torch.Tensor | None) -> Record | Attack | None:
        """Advance the procedure with the answer to its last request (counts, or an Attack's image): the
        next Draw (kept, None returned), an Attack (returned, for the sampler to serve at once) or the finished
        record (returned)."""
        try:
            request = next(self.run) if answer is None else self.run.send(answer)
        except StopIteration as stop:
            return stop.value
        if isinstance(request, Attack):
            return request
        if not isinstance(request, Draw) or request.num < 1:
            raise ValueError(f"a procedure must yield Draw(stage, num >= 1) or an Attack, got {request!r}")
        self._request, self.assigned = request, 0
        self.counts.zero_()
        return None


@dataclasses.dataclass
class _Launched:
    """A forward batch launched on the device, as far as the host must still read it: the images whose request
    it completed, in batch order, and their tallies [N, K+1] (counts, non-finite) on the host, filled
    asynchronously on CUDA until ``ready`` (None elsewhere)."""

    number: int  # the batch's launch number (1 for the sampler's first)
    complete: list[_Image]
    tallies: torch.Tensor
    ready: torch.cuda.Event | None


class Sampler:
    """Serves the Draw requests of many images with the smoothed classifier's noisy forward passes.

    ``submit(idx, image, label, procedure)`` starts the procedure's run on an image, with this sampler's
    noise, and runs the batches the images in flight fill; ``drain()`` finishes them all; both yield each
    ``(idx, record)`` the moment it is finished. ``noise`` cannot be replaced: a sampler for another noise is
    another sampler.
    """

    def __init__(
        self,
        classifier: nn.Module,
        num_classes: int,
        noise: Noise,
        seed: int,
        batch_size: int,
        precision: str | None = None,
        compile: bool = False,
        device: torch.device | str = "cpu",
        pipeline: bool | None = None,
    ):
        self.device = torch.device(device)
        if not isinstance(noise, Noise):
            raise TypeError(
                f"noise must be a dmae_lightning.noise.Noise (e.g. GaussianNoise(0.25)), got {noise!r}"
            )
        self._noise = noise
        self.num_classes, self.seed, self.batch_size = num_classes, seed, batch_size
        self.precision = resolve_precision(precision, self.device)
        self.compile = compile
        # torch.compile specialises on the input shape: a fixed batch shape keeps one graph for the run.
        self.classifier = classifier  # eager: the attack's forward and backward passes
        self.forward = torch.compile(classifier) if compile else classifier
        self.images: list[_Image] = []  # in arrival order: forward batches are filled from the front
        self.buffer: torch.Tensor | None = None  # [batch_size,C,H,W], reused by every batch
        # Two batches in flight: batch t+1 is launched before batch t's counts are read back (same results;
        # None: on CUDA only, where the launch is asynchronous; on the CPU it would only change the packing).
        self.pipeline = self.device.type == "cuda" if pipeline is None else pipeline
        self._in_flight: _Launched | None = None  # launched, its completed requests not yet read back
        self.launches = 0  # forward batches launched so far

    @property
    def noise(self) -> Noise:
        """The noise every sample is drawn from and every run of this sampler certifies with (read-only)."""
        return self._noise

    @property
    def pending_rows(self) -> int:
        return sum(im.request.num - im.assigned for im in self.images)

    def add(
        self, idx: int, image: torch.Tensor, label: int, procedure: Procedure
    ) -> tuple[int, Record] | None:
        """Start ``procedure``'s run on ``image`` [C,H,W] with this sampler's noise; returns ``(idx, record)``
        at once if it needs no samples."""
        if not isinstance(procedure, Procedure):  # e.g. a run started elsewhere, with another noise
            raise TypeError(
                f"the sampler starts the run itself, with its own noise: pass a Procedure "
                f"(Certify, Predict, CertifyRadii, AttackPredict), got {type(procedure).__name__}"
            )
        for name, value in (("idx", idx), ("label", label)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an integer, got {value!r}")
        if any(item.idx == idx for item in self.images):
            raise ValueError(
                f"image idx {idx} is already being certified: every image needs its own idx "
                "(its noise is seeded by it)"
            )
        image = check_image(image).to(self.device)
        self._noise.check_input(image)
        if self.buffer is None or self.buffer.shape[1:] != image.shape:
            if self.images and self.buffer is not None:
                raise ValueError(
                    f"image {idx} has shape {tuple(image.shape)}, the images in flight "
                    f"{tuple(self.buffer.shape[1:])}: one run certifies images of one size"
                )
            self.buffer = torch.empty((self.batch_size, *image.shape), device=self.device)  # [B,C,H,W]
            self._ones = torch.ones(self.batch_size, dtype=torch.long, device=self.device)  # [B]
        item = _Image(idx, image, procedure.run(idx, label, self._noise), self.num_classes)
        record = self._advance(item, None)
        if record is not None:
            return self._finish(item, record)
        self.images.append(item)
        return None

    def _advance(self, item: _Image, answer: torch.Tensor | None) -> Record | None:
        """Send ``answer`` to ``item``'s run and serve its Attacks until it asks for a Draw (None) or is done."""
        step = item.ask(answer)
        while isinstance(step, Attack):
            step = item.ask(self.attack(item.idx, item.image, step))
        request = item.request if step is None else None
        if isinstance(request, DrawAround):
            center = check_image(request.image).to(self.device)
            if center.shape != item.image.shape:
                raise ValueError(
                    f"image {item.idx}: a DrawAround image of shape {tuple(center.shape)}, the image's is "
                    f"{tuple(item.image.shape)}"
                )
            self._noise.check_input(center)
            item._request = dataclasses.replace(request, image=center)
        return step

    def _generator(self, idx: int, stage: int, block: int) -> torch.Generator:
        return seeded_generator(self.seed, CERTIFY_STREAM, idx, stage, block, device=self.device)

    def stage_samples(self, idx: int, stage: int, num: int, center: torch.Tensor) -> torch.Tensor:
        """The first ``num`` samples of image ``idx``'s stage ``stage`` around ``center`` [C,H,W]: [num,C,H,W]
        (the rows a Draw of that stage would get first)."""
        out = torch.empty((num, *center.shape), device=self.device)
        block_out = torch.empty((NOISE_BLOCK, *center.shape), device=self.device)
        for block, start in enumerate(range(0, num, NOISE_BLOCK)):
            rows = min(NOISE_BLOCK, num - start)
            target = out[start : start + rows] if rows == NOISE_BLOCK else block_out
            self._noise.noisy_copies(center, self._generator(idx, stage, block), target)
            if rows < NOISE_BLOCK:
                out[start:].copy_(block_out[:rows])
        return out

    def attack(self, idx: int, image: torch.Tensor, request: Attack) -> torch.Tensor:
        """The adversarial image [C,H,W] of an L2 PGD on the soft smoothed classifier (Salman et al. 2019, the
        attack of Hadisalman/smoothing-adversarial ``code/attacks.py`` PGD_L2 with several noise vectors):

        delta_1..delta_m (m = ``samples``): the first m samples of stage ``request.stage`` of a zero image,
        drawn once, the same at every step. Each of ``steps`` steps moves x' by ``step_size * eps / steps``
        along the normalised gradient of -log G(x')_y, G(x') = mean_i softmax(f(x' + delta_i)) (computed as
        a logsumexp of log-softmaxes: no underflow where G_y is tiny; a zero or non-finite gradient is
        replaced by a random direction), then clamps x' to [0,1] and projects it onto ||x' - x||_2 <= eps
        (the reference's order). ``random_start``: x' starts at a uniform point of the eps-ball (clamped),
        otherwise at x. Float32, eager classifier, autograd on even under the job's inference mode; the
        classifier's parameters get no gradients. A noise that certifies only images on the 8-bit grid
        (the discrete Gaussian) gets x' with its perturbation rounded toward zero onto the grid, which keeps
        it within the ball.
        """
        eps, label = float(request.eps), request.label
        if not 0 <= label < self.num_classes:
            raise ValueError(f"image {idx}: the attack needs a label in [0, {self.num_classes}), got {label}")
        if eps == 0:
            return image
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            torch.autocast(self.device.type, enabled=False),
        ):
            x = image.detach().clone()  # a normal tensor even when the job runs under inference mode
            deltas = self.stage_samples(idx, request.stage, request.samples, torch.zeros_like(x))  # [m,C,H,W]
            generator = self._generator(idx, request.stage, ATTACK_BLOCK)

            def direction() -> torch.Tensor:  # a uniform unit vector, [C,H,W]
                z = torch.randn(x.shape, generator=generator, device=self.device)
                return z / z.norm()

            def project(delta: torch.Tensor) -> torch.Tensor:  # into [0,1], then into the eps-ball
                delta = (x + delta).clamp(0, 1) - x
                return delta * torch.clamp(eps / delta.norm(), max=1.0)

            delta = torch.zeros_like(x)
            if request.random_start:
                u = torch.rand((), generator=generator, device=self.device)
                delta = project(direction() * eps * u ** (1 / x.numel()))
            step = request.step_size * eps / request.steps
            broken = torch.zeros((), dtype=torch.bool, device=self.device)
            for _ in range(request.steps):
                delta.requires_grad_(True)
                logits = self.classifier((x + delta).unsqueeze(0) + deltas).float()  # [m,K]
                broken |= ~torch.isfinite(logits).all()
                log_g = torch.logsumexp(torch.log_softmax(logits, dim=1)[:, label], dim=0)  # + log m
                (grad,) = torch.autograd.grad(-log_g, delta)
                norm = grad.norm()
                ascent = torch.where(norm > 0, grad / norm, direction())  # NaN norm: not > 0
                delta = project(delta.detach() + step * ascent)
            if bool(broken):
                raise NonFiniteLogits(
                    f"image {idx}: the base classifier returned NaN/Inf logits during the attack at radius "
                    f"{eps:g}: refusing a broken model (check the checkpoint's weights)"
                )
            adv = (x + delta).clamp(0, 1).detach()
        try:
            self._noise.check_input(adv)
        except ValueError:  # e.g. the discrete noise: onto the 8-bit grid, rounding the perturbation toward 0
            adv = ((x * 255).round() + ((adv - x) * 255).trunc()).div(255).clamp(0, 1)
            self._noise.check_input(adv)
        return adv

    def _fill(self, item: _Image, take: int, out: torch.Tensor) -> None:
        """Write the next ``take`` noisy copies x + eps of ``item``'s request stream into ``out`` [take,C,H,W]
        (x: the request's image for a DrawAround, else the run's)."""
        request = item.request
        center = request.image if isinstance(request, DrawAround) else item.image
        stage, pos = request.stage, 0
        while pos < take:
            start = item.drawn.get(stage, 0)
            block, offset = divmod(start, NOISE_BLOCK)
            k = min(NOISE_BLOCK - offset, take - pos)
            if k == NOISE_BLOCK:  # a whole block: drawn straight into the batch
                self._noise.noisy_copies(center, self._generator(item.idx, stage, block), out[pos : pos + k])
            else:  # part of a block: draw it whole once, keep it until its last row is used
                if item.cache is None or item.cache[:2] != (stage, block):
                    block_out = torch.empty(
                        (NOISE_BLOCK, *center.shape), device=self.device
                    )  # [NOISE_BLOCK,C,H,W]
                    self._noise.noisy_copies(center, self._generator(item.idx, stage, block), block_out)
                    item.cache = (stage, block, block_out)
                out[pos : pos + k].copy_(item.cache[2][offset : offset + k])
                if offset + k == NOISE_BLOCK:
                    item.cache = None
            item.drawn[stage] = start + k
            pos += k

    def step(self) -> Iterator[tuple[int, Record]]:
        """Launch one forward batch over the oldest pending requests, then read back the counts of the batch
        launched before it (with ``pipeline``; without, of this one); yields the (idx, record) of each image
        whose request that read-back completed and that is finished. With nothing left to launch, it only reads
        back the batch in flight."""
        waiting, self._in_flight = self._in_flight, None
        pending = self.pending_rows
        if pending and (waiting is None or pending >= self.batch_size):
            launched = self._launch()
            if self.pipeline:  # this batch runs on the device while the host decides on the previous one
                self._in_flight, launched = launched, waiting
        elif waiting is not None:  # the requests known would not fill a batch: the decisions first
            launched = waiting
        else:  # images in flight but nothing to draw or read: a request was left by an aborted call
            raise RuntimeError(
                "sampler: images in flight have no pending samples (call reset() after an error)"
            )
        if launched is not None:
            yield from self._collect(launched)

    def _launch(self) -> _Launched | None:
        """Fill and launch one forward batch over the oldest pending requests, accumulating its votes on the
        device; the requests it completes get their tallies copied to the host asynchronously. Returns those
        requests (None if it completed none): nothing here waits for the device."""
        buffer = self.buffer
        if buffer is None:  # set by add() with the first image's shape
            raise RuntimeError("sampler: no image has been added (call submit() first)")
        segments: list[tuple[_Image, int]] = []  # (image, rows) in batch order
        rows = 0
        for item in self.images:
            take = min(item.request.num - item.assigned, self.batch_size - rows)
            if take > 0:
                self._fill(item, take, buffer[rows : rows + take])
                segments.append((item, take))
                rows += take
            if rows == self.batch_size:
                break
        batch = buffer if self.compile else buffer[:rows]  # [B,C,H,W] (padded rows are ignored)
        if self.compile and rows < self.batch_size:
            buffer[rows:].zero_()
        dtype = AUTOCAST[self.precision]
        autocast = torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            logits = self.forward(batch)  # [B,K]
        self.launches += 1
        if logits.ndim != 2 or logits.shape[0] != batch.shape[0] or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"base classifier returned logits of shape {tuple(logits.shape)}, "
                f"expected {(batch.shape[0], self.num_classes)}"
            )
        logits = logits[:rows]  # [R,K]
        votes = top_class(logits)  # [R]
        broken = ~torch.isfinite(logits).all(dim=1)  # [R]
        start, complete = 0, []
        for item, take in segments:
            # index_add_ and sum on slices: no host sync (bincount and one_hot read the data back on CUDA)
            item.counts.index_add_(0, votes[start : start + take], self._ones[:take])
            item.nonfinite += broken[start : start + take].sum()
            item.assigned += take
            start += take
            if item.assigned == item.request.num:
                complete.append(item)
        if not complete:
            return None
        # The requests this batch completed: one read-back for all of them, [N, K+1] (counts, non-finite),
        # copied now, waited for only when the host needs it (on CUDA into pinned memory, behind an event)
        tallies = torch.stack([torch.cat([item.counts, item.nonfinite.view(1)]) for item in complete])
        ready = None
        if self.device.type == "cuda":
            tallies = tallies.to("cpu", non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            tallies = tallies.cpu()
        return _Launched(self.launches, complete, tallies, ready)

    def _collect(self, launched: _Launched) -> Iterator[tuple[int, Record]]:
        """Wait for ``launched``'s tallies (the host read-back) and advance each completed request's run."""
        if launched.ready is not None:
            launched.ready.synchronize()
        for item, row in zip(launched.complete, launched.tallies):
            if int(row[-1]):
                raise NonFiniteLogits(
                    f"image {item.idx}: the base classifier returned NaN/Inf logits for "
                    f"{int(row[-1])} of {item.request.num} noisy samples: refusing to certify a "
                    "broken model (check the checkpoint's weights)"
                )
            record = self._advance(item, row[:-1])
            if record is not None:
                self.images.remove(item)
                yield self._finish(item, record)  # at once: a later image's error must not lose it

    def _finish(self, item: _Image, record: Record) -> tuple[int, Record]:
        if dataclasses.is_dataclass(record) and hasattr(record, "time"):
            record = record.timed(time.perf_counter() - item.started)
        return item.idx, record

    def submit(
        self, idx: int, image: torch.Tensor, label: int, procedure: Procedure
    ) -> Iterator[tuple[int, Record]]:
        """Start ``procedure`` on ``image`` now (see :meth:`add`: refusals come at the call), then run the
        forward batches the images in flight fill completely, yielding each finished (idx, record) (lazily:
        no forward pass happens until the result is iterated)."""
        done = self.add(idx, image, label, procedure)
        return itertools.chain([] if done is None else [done], self.run_full_batches())

    def run_full_batches(self) -> Iterator[tuple[int, Record]]:
        """Forward batches while the pending requests fill a whole batch (then more images are needed);
        yields each image's (idx, record) as soon as it is finished, so the caller can save it at once."""
        while self.images and self.pending_rows >= self.batch_size:
            yield from self.step()

    def reset(self) -> None:
        """Forget the images in flight (after an error aborted a run)."""
        self.images.clear()
        self._in_flight = None

    def drain(self) -> Iterator[tuple[int, Record]]:
        """Forward batches until every image in flight is finished, yielding each as it finishes."""
        while self.images:
            yield from self.step()
