"""A SAM 2 video session: objects prompted on some frames, tracked through the others.

:class:`Sam2Video` follows the official ``SAM2VideoPredictor``. Prompts (points, a box,
or a mask) on a frame the object has not been tracked through make it a *conditioning*
frame: segmented like an image, without memory. Prompts on a frame it has been tracked
through are *corrections*: the decoder sees the memory-conditioned features, the new
clicks and the earlier logits. Nothing is written to memory until :meth:`propagate`
starts: then every prompted frame's result is encoded into the object's memory, and the
objects are tracked frame by frame, forward or in reverse, each frame attending to the
object's conditioning frames, its last ``num_maskmem - 1`` frames and its object
pointers (see :mod:`.tracking`).

A correction stays an ordinary tracked frame unless ``add_all_frames_to_correct_as_cond``:
its result then feeds the memory of frames tracked before propagation reaches it again,
and propagation through it tracks it anew, as the official predictor does. With the
option, a corrected frame becomes a conditioning frame and keeps its result.

Frames: indices ``0 .. num_frames - 1``. Coordinates: (x, y) pixels of the original
frame (``video_size`` = (H, W)). Logits come back at the original size, one (H, W)
plane per object in the order of :attr:`Sam2Video.obj_ids`; ``> 0`` is the mask.
Image features come from a callable, so that a caller can serve them from a cache.
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from collections.abc import Callable, Generator, Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .sam2 import NO_OBJ_SCORE
from .tracking import FrameFeatures, FrameOutput, encode_new_memory, frame_features, track_step
from .video_state import ObjectState, fill_holes, non_overlapping, prompt_points

if TYPE_CHECKING:
    from .sam2 import Sam2

__all__ = ["Sam2Video"]


class Sam2Video:
    """Track objects through a sequence of frames with SAM 2's memory.

    Parameters
    ----------
    model
        A :class:`~.sam2.Sam2` in evaluation mode.
    features
        ``features(frame_index)`` -> :meth:`Sam2.forward_image` output for that frame (batch
        1, on the model's device), e.g. served from a cache.
    num_frames
        Length of the sequence.
    video_size
        (H, W) of the original frames, the frame of prompts and results.
    fill_hole_area, non_overlap_masks, clear_non_cond_mem_around_input, add_all_frames_to_correct_as_cond
        The official video predictor's settings; None takes the model configuration's.
        ``fill_hole_area`` fills background regions of at most that many low-resolution
        pixels (8-connected) in every result, as the official CUDA extension does.
    feature_cache
        How many frames' prepared features to keep (the official keeps one).
    """

    def __init__(self, model: "Sam2", features: Callable[[int], Mapping[str, Any]], num_frames: int,
                 video_size: tuple[int, int], *, fill_hole_area: int | None = None,
                 non_overlap_masks: bool | None = None, clear_non_cond_mem_around_input: bool | None = None,
                 add_all_frames_to_correct_as_cond: bool | None = None, feature_cache: int = 2):
        c = model.config
        if num_frames < 1:
            raise ValueError(f"a video needs at least one frame, not {num_frames}")
        if len(video_size) != 2 or min(video_size) < 1:
            raise ValueError(f"video_size must be (H, W) in pixels, not {video_size}")
        if model.num_maskmem > 0 and not c.directly_add_no_mem_embed:
            raise ValueError("Sam2Video needs directly_add_no_mem_embed=True (as every SAM 2.1 model)")
        self.model = model
        self.features = features
        self.num_frames = int(num_frames)
        self.video_size = (int(video_size[0]), int(video_size[1]))
        self.fill_hole_area = int(c.fill_hole_area if fill_hole_area is None else fill_hole_area)
        self.non_overlap_masks = bool(c.non_overlap_masks if non_overlap_masks is None else non_overlap_masks)
        self.clear_non_cond_mem_around_input = bool(
            c.clear_non_cond_mem_around_input if clear_non_cond_mem_around_input is None
            else clear_non_cond_mem_around_input)
        self.add_all_frames_to_correct_as_cond = bool(
            c.add_all_frames_to_correct_as_cond if add_all_frames_to_correct_as_cond is None
            else add_all_frames_to_correct_as_cond)
        self._cache_size = max(1, int(feature_cache))
        self._frames: OrderedDict[int, FrameFeatures] = OrderedDict()
        self._objects: dict[Hashable, ObjectState] = {}

    # ---------------------------------------------------------------- objects

    @property
    def obj_ids(self) -> list[Hashable]:
        """Object ids in the order of the result planes."""
        return list(self._objects)

    def reset(self) -> None:
        """Forget every object, prompt and result (the features stay cached)."""
        self._objects.clear()

    def remove_object(self, obj_id: Hashable) -> list[tuple[int, torch.Tensor]]:
        """Forget one object.

        Returns
        -------
        list of (frame, logits (O, H, W)) for the frames the object had prompts on, with
        the remaining objects' results there; empty when no object remains.
        """
        state = self._state(obj_id)
        frames = sorted(set(state.points) | set(state.masks))
        del self._objects[obj_id]
        updated = []
        for frame in frames:
            is_cond = any(frame in s.temp.cond for s in self._objects.values())
            updated.append((frame, self._consolidated(frame, is_cond)))
        return updated if self._objects else []

    def object_scores(self, frame: int) -> torch.Tensor:
        """(O,) presence logits of the objects in memory on a frame (> 0: the model sees
        the object), NaN where an object has no result there yet (prompts not yet
        propagated count as none)."""
        frame = self._check_frame(frame)
        scores = torch.full((len(self._objects),), float("nan"))
        for i, s in enumerate(self._objects.values()):
            out = s.output.cond.get(frame) or s.output.non_cond.get(frame)
            if out is not None:
                scores[i] = out.object_score_logits.reshape(()).float().cpu()
        return scores

    def _state(self, obj_id: Hashable) -> ObjectState:
        if obj_id not in self._objects:
            raise ValueError(f"unknown object id {obj_id!r}; known: {self.obj_ids}")
        return self._objects[obj_id]

    # ---------------------------------------------------------------- prompts

    @torch.inference_mode()
    def add_points(self, frame: int, obj_id: Hashable, points: Any = None, labels: Any = None,
                   box: Any = None, clear_old: bool = True) -> torch.Tensor:
        """Prompt (or correct) an object on a frame with clicks and/or a box.

        Parameters
        ----------
        frame
            Frame index.
        obj_id
            Any hashable id; a new id adds an object.
        points, labels
            (N, 2) clicks as (x, y) pixels of the original frame and (N,) labels, 1 for the
            object and 0 for background; both or neither.
        box
            (4,) box (x0, y0, x1, y1) in the same pixels; needs ``clear_old``.
        clear_old
            Replace the object's earlier clicks on this frame (else add to them).

        Returns
        -------
        (O, H, W) float32 logits on this frame, one plane per object of :attr:`obj_ids`.
        """
        frame = self._check_frame(frame)
        coords, point_labels = prompt_points(points, labels, box, clear_old, self.video_size, self.model.image_size)
        coords, point_labels = coords.to(self.model.device), point_labels.to(self.model.device)
        state = self._objects.setdefault(obj_id, ObjectState())
        if not clear_old and frame in state.points:
            old_coords, old_labels = state.points[frame]
            coords = torch.cat([old_coords, coords], dim=1)
            point_labels = torch.cat([old_labels, point_labels], dim=1)
        state.points[frame] = (coords, point_labels)
        state.masks.pop(frame, None)
        is_init, reverse, is_cond = self._frame_role(state, frame)
        store = state.temp.cond if is_cond else state.temp.non_cond
        prev = store.get(frame) or state.output.cond.get(frame) or state.output.non_cond.get(frame)
        prev_logits = None if prev is None else prev.pred_masks.clamp(-32.0, 32.0)
        store[frame] = self._run_frame(frame, [state], is_init_cond_frame=is_init, reverse=reverse,
                                       point_inputs={"point_coords": coords, "point_labels": point_labels},
                                       run_mem_encoder=False, prev_sam_mask_logits=prev_logits)
        return self._consolidated(frame, is_cond)

    @torch.inference_mode()
    def add_mask(self, frame: int, obj_id: Hashable, mask: Any) -> torch.Tensor:
        """Prompt (or correct) an object on a frame with a mask.

        Parameters
        ----------
        mask
            (H, W) bool mask in the original frame.

        Returns
        -------
        (O, H, W) float32 logits on this frame, as :meth:`add_points`.
        """
        frame = self._check_frame(frame)
        m = torch.as_tensor(mask, device=self.model.device)
        if tuple(m.shape) != self.video_size:
            raise ValueError(f"mask must be (H, W) = {self.video_size}, not {tuple(m.shape)}")
        S = self.model.image_size
        m = m.bool().float()[None, None]
        if tuple(m.shape[-2:]) != (S, S):
            m = F.interpolate(m, size=(S, S), mode="bilinear", align_corners=False, antialias=True)
            m = (m >= 0.5).float()
        state = self._objects.setdefault(obj_id, ObjectState())
        state.masks[frame] = m
        state.points.pop(frame, None)
        is_init, reverse, is_cond = self._frame_role(state, frame)
        store = state.temp.cond if is_cond else state.temp.non_cond
        store[frame] = self._run_frame(frame, [state], is_init_cond_frame=is_init, reverse=reverse,
                                       mask_inputs=m, run_mem_encoder=False)
        return self._consolidated(frame, is_cond)

    @torch.inference_mode()
    def clear_prompts(self, frame: int, obj_id: Hashable) -> torch.Tensor:
        """Remove an object's prompts on a frame; a conditioning result there becomes an
        ordinary tracked one. Returns the frame's (O, H, W) logits."""
        frame = self._check_frame(frame)
        state = self._state(obj_id)
        state.points.pop(frame, None)
        state.masks.pop(frame, None)
        state.temp.cond.pop(frame, None)
        state.temp.non_cond.pop(frame, None)
        out = state.output.cond.pop(frame, None)
        if out is not None:
            state.output.non_cond[frame] = out
            state.tracked.pop(frame, None)
        is_cond = any(frame in s.temp.cond for s in self._objects.values())
        return self._consolidated(frame, is_cond)

    def _frame_role(self, state: ObjectState, frame: int) -> tuple[bool, bool, bool]:
        """(initial conditioning frame, tracked in reverse, stored as conditioning)."""
        is_init = frame not in state.tracked
        reverse = False if is_init else state.tracked[frame]
        return is_init, reverse, is_init or self.add_all_frames_to_correct_as_cond

    # ---------------------------------------------------------------- propagation

    @torch.inference_mode()
    def propagate(self, start: int | None = None, max_frames: int | None = None,
                  reverse: bool = False) -> Generator[tuple[int, list[Hashable], torch.Tensor], None, None]:
        """Track every object through the frames, from ``start`` on (or back).

        Parameters
        ----------
        start
            First frame; default the earliest conditioning frame of any object.
        max_frames
            Frames to go beyond ``start`` (default: to the end of the sequence).
        reverse
            Go towards frame 0.

        Yields
        ------
        (frame, obj_ids, logits (O, H, W)) for every frame in processing order.
        """
        self._preflight()
        obj_ids = self.obj_ids
        states = list(self._objects.values())
        if start is None:
            start = min(t for s in states for t in s.output.cond)
        start = self._check_frame(start)
        if max_frames is None:
            max_frames = self.num_frames
        elif max_frames < 0:
            raise ValueError(f"max_frames must be at least 0, not {max_frames}")
        if reverse:
            end = max(start - max_frames, 0)
            order = range(start, end - 1, -1) if start > 0 else range(0)
        else:
            end = min(start + max_frames, self.num_frames - 1)
            order = range(start, end + 1)
        for frame in order:
            masks: list[torch.Tensor | None] = [None] * len(states)
            todo = []
            for i, s in enumerate(states):
                if frame in s.output.cond:
                    masks[i] = s.output.cond[frame].pred_masks
                    if self.clear_non_cond_mem_around_input:
                        self._clear_around(s, frame)
                else:
                    todo.append(i)
            if todo:
                out = self._run_frame(frame, [states[i] for i in todo], is_init_cond_frame=False, reverse=reverse,
                                      run_mem_encoder=True)
                for j, i in enumerate(todo):
                    states[i].output.non_cond[frame] = out.select(j)
                    masks[i] = out.pred_masks[j:j + 1]
            for s in states:
                s.tracked[frame] = reverse
            yield frame, obj_ids, self._video_res(torch.cat([m for m in masks if m is not None]))

    def _preflight(self) -> None:
        """Encode the prompted frames' results into memory (official preflight)."""
        if not self._objects:
            raise ValueError("no object has prompts: add points, a box or a mask first")
        for obj_id, s in self._objects.items():
            if not s.output.cond and not s.temp.cond:
                raise ValueError(f"object {obj_id!r} has no prompt on a frame it was not tracked through")
        S = self.model.image_size
        for s in self._objects.values():
            for temp, output in ((s.temp.non_cond, s.output.non_cond), (s.temp.cond, s.output.cond)):
                for frame, out in temp.items():
                    if out.maskmem_features is None:
                        high = F.interpolate(out.pred_masks, size=(S, S), mode="bilinear", align_corners=False)
                        out.maskmem_features = encode_new_memory(self.model, self._frame(frame), high,
                                                                 out.object_score_logits, is_mask_from_pts=True)
                    output[frame] = out
                    if self.clear_non_cond_mem_around_input:
                        self._clear_around(s, frame)
                temp.clear()
            for frame in s.output.cond:
                s.output.non_cond.pop(frame, None)

    def _clear_around(self, state: ObjectState, frame: int) -> None:
        """Drop an object's tracked memories near a prompted frame (they may contradict it),
        but not the frame's own result.

        The official 1.1.0 predictor calls a per-object method it lacks (so the option
        fails there); its predecessor cleared every object's memories, the prompted
        frame's own tracked result included.
        """
        r = self.model.config.memory_temporal_stride_for_eval * self.model.num_maskmem
        for t in range(frame - r, frame + r + 1):
            if t != frame:
                state.output.non_cond.pop(t, None)

    # ---------------------------------------------------------------- frames

    def _check_frame(self, frame: int) -> int:
        """The frame index as an int, or a ValueError."""
        try:
            index = operator.index(frame)
        except TypeError:
            raise ValueError(f"a frame is an integer index, not {frame!r}") from None
        if not 0 <= index < self.num_frames:
            raise ValueError(f"frame {frame} is outside the video's frames 0..{self.num_frames - 1}")
        return index

    def _frame(self, frame: int) -> FrameFeatures:
        """Prepared features of a frame, from the small cache or the callable."""
        cached = self._frames.get(frame)
        if cached is not None:
            self._frames.move_to_end(frame)
            return cached
        prepared = frame_features(self.model, self.features(frame))
        self._frames[frame] = prepared
        while len(self._frames) > self._cache_size:
            self._frames.popitem(last=False)
        return prepared

    def _run_frame(self, frame: int, states: Sequence[ObjectState], *, is_init_cond_frame: bool, reverse: bool,
                   point_inputs: Mapping[str, torch.Tensor] | None = None, mask_inputs: torch.Tensor | None = None,
                   run_mem_encoder: bool, prev_sam_mask_logits: torch.Tensor | None = None) -> FrameOutput:
        out = track_step(self.model, self._frame(frame), frame, [s.output for s in states],
                         is_init_cond_frame=is_init_cond_frame, num_frames=self.num_frames, reverse=reverse,
                         point_inputs=point_inputs, mask_inputs=mask_inputs, run_mem_encoder=run_mem_encoder,
                         prev_sam_mask_logits=prev_sam_mask_logits)
        if self.fill_hole_area > 0:
            out.pred_masks = fill_holes(out.pred_masks, self.fill_hole_area)
        return out

    def _consolidated(self, frame: int, is_cond: bool) -> torch.Tensor:
        """Every object's latest logits on a frame at the original size (O, H, W)."""
        H, W = self.video_size
        planes = torch.full((len(self._objects), 1, H, W), NO_OBJ_SCORE, device=self.model.device)
        for i, s in enumerate(self._objects.values()):
            temp = s.temp.cond if is_cond else s.temp.non_cond
            out = temp.get(frame) or s.output.cond.get(frame) or s.output.non_cond.get(frame)
            if out is not None:
                planes[i:i + 1] = F.interpolate(out.pred_masks, size=(H, W), mode="bilinear", align_corners=False)
        return non_overlapping(planes)[:, 0] if self.non_overlap_masks else planes[:, 0]

    def _video_res(self, pred_masks: torch.Tensor) -> torch.Tensor:
        """(O, 1, S/4, S/4) logits -> (O, H, W) at the original size."""
        planes = F.interpolate(pred_masks, size=self.video_size, mode="bilinear", align_corners=False)
        return non_overlapping(planes)[:, 0] if self.non_overlap_masks else planes[:, 0]
