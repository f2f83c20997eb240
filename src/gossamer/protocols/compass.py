"""FedCompass' decisions inside the async FL protocol (Li et al., ICLR 2024, arXiv:2309.14675;
the scheduler's maths is ``algorithms/fl/fedcompass.py``). Dispatch: clients served together are
assigned fastest first; without a speed estimate a client trains ``max_local_steps`` in no group.
Arrival: the speed estimate takes the task's seconds per step; a first task is applied alone; a
late arrival (at or after its group's latest time, or after it closed) goes to the general
buffer and asks again at once; otherwise it waits until its group has no member training.
Timers: at an open group's latest time it aggregates what arrived, or closes empty.
"""

from __future__ import annotations

import math

import numpy as np


class CompassGroups:
    """Mixin of :class:`~gossamer.protocols.async_fl.AsyncFLProtocol` (uses its ``schedule``,
    ``group_buffer``, ``buffer``, ``algorithm``, ``_apply`` and its record class ``Step``)."""

    def group_timer(self) -> float:
        """The earliest latest-arrival time of an open group (inf: none)."""
        if self.schedule is None or self.stopped:
            return math.inf
        return min((g.latest_s for g in self.schedule.groups.values() if g.open), default=math.inf)

    def compass_steps(self, nodes: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray]:
        """Order ``nodes`` fastest first and give each its local steps (joining or creating groups)."""
        sched, algo = self.schedule, self.algorithm
        speed = sched.speed[nodes]
        nodes = nodes[np.lexsort((nodes, np.where(np.isnan(speed), np.inf, speed)))]
        steps = np.array([algo.max_local_steps if np.isnan(sched.speed[c]) else algo.assign(sched, int(c), t)
                          for c in nodes.tolist()], dtype=np.int64)
        return nodes, steps

    def compass_arrival(self, task, entry, t: float):
        """A delivered task (``entry`` None when discarded as too stale)."""
        sched, c = self.schedule, task.client
        sched.speed[c] = self.algorithm.update_speed(float(sched.speed[c]), (t - task.start_s) / task.steps)
        g = int(sched.group[c])
        if g < 0:                                       # first task: applied alone, then assigned
            return self._apply([entry]) if entry is not None else self.Step()
        group = sched.groups[g]
        if not group.open or t >= group.latest_s:      # late: general buffer, re-assigned at once
            sched.leave(c)
            if entry is not None:
                self.buffer.append(entry)
            return self.Step(dispatch=True)
        group.members.remove(c)
        group.arrived.append(c)
        if entry is not None:
            self.group_buffer.setdefault(g, []).append(entry)
        return self._close_group(g) if not group.members else self.Step()

    def compass_lost(self, client: int):
        """A task that never reaches the server: the client leaves its group (it asks for work
        again), which may complete the group."""
        g = self.schedule.leave(client)
        group = self.schedule.groups.get(g)
        if group is not None and group.open and not group.members:
            return self._close_group(g)
        return self.Step()

    def compass_timers(self, t: float):
        """Open groups whose latest arrival time has come: aggregate what arrived, else close."""
        for g in sorted(self.schedule.groups):
            group = self.schedule.groups.get(g)
            if group is None or not group.open or group.latest_s > t:
                continue
            if group.arrived:
                step = self._close_group(g)
                if step.update is not None:
                    return step
            else:                                       # nobody arrived: members will be late
                group.open = False
        return self.Step()

    def _close_group(self, g: int):
        """Group ``g`` aggregates its buffered updates and the general buffer (no update when
        both are empty); its arrived clients are free to be assigned again."""
        self.schedule.release(g)
        entries, self.buffer = self.buffer + self.group_buffer.pop(g, []), []
        return self._apply(entries) if entries else self.Step()
