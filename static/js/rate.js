// Upload speed and time left, from (time, bytes sent) samples over a sliding window: no DOM, no
// clock of its own (the page passes performance.now()), so node tests drive time by hand.

export class RateMeter {
  /** @param {{windowMs?: number}} [options] how far back samples count (default 5 s) */
  constructor({ windowMs = 5000 } = {}) {
    this.windowMs = windowMs;
    this.samples = [];
  }

  /** Record that `sent` bytes in all had gone by `now` (milliseconds). */
  sample(now, sent) {
    const last = this.samples.at(-1);
    if (last && sent < last.sent) this.samples = []; // a cancel or retry took bytes back
    this.samples.push({ now, sent });
    while (this.samples.length > 2 && now - this.samples[0].now > this.windowMs) this.samples.shift();
  }

  /** Bytes per second over the window, or null until there is enough to say. */
  bytesPerSecond() {
    if (this.samples.length < 2) return null;
    const first = this.samples[0];
    const last = this.samples.at(-1);
    const seconds = (last.now - first.now) / 1000;
    if (seconds < 0.5 || last.sent <= first.sent) return null;
    return (last.sent - first.sent) / seconds;
  }

  /** Whole seconds left for `remaining` bytes at the current speed, or null when unknown. */
  secondsLeft(remaining) {
    const speed = this.bytesPerSecond();
    if (!speed) return null;
    return Math.max(0, Math.ceil(remaining / speed));
  }
}

/** Say a duration the way people do: "8 s", "2 min 5 s". */
export function humanDuration(seconds) {
  if (seconds < 60) return `${seconds} s`;
  const minutes = Math.floor(seconds / 60);
  const rest = seconds % 60;
  return rest ? `${minutes} min ${rest} s` : `${minutes} min`;
}
