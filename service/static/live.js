// The dashboard's live charts, drawn with uPlot (vendored in /static/vendor, loaded as the global `uPlot`).
//
// `LiveCharts.update(stats)` takes one answer of GET /api/stats and moves every chart in place: rates are the
// difference between two answers divided by the time between them, so the first answer only sets the baseline.
// Charts are created once and then only given new data (uPlot's setData), never rebuilt, except the per-channel
// chart, which is rebuilt when the set of channels it shows changes.

const WINDOW_POINTS = 120; // samples kept per series (two minutes at one answer per second)
const MAX_CHANNEL_SERIES = 6; // the busiest channels get a line each
const LATENCY_WINDOW_S = 60; // the latency histogram shows the events of the last minute
const PALETTE = ["#2f6fde", "#1f9d55", "#c77c02", "#c9372c", "#7c3aed", "#0e7490"];

export function formatRate(value) {
  if (value == null) return "–";
  return value >= 1000 ? `${(value / 1000).toFixed(1)}k` : value >= 10 ? value.toFixed(0) : value.toFixed(1);
}

function formatSeconds(seconds) {
  return seconds < 1 ? `${+(seconds * 1000).toFixed(1)}ms` : `${seconds}s`;
}

/** "≤2.5 ms" for a bucket's upper bound, ">10 s" for the last (unbounded) bucket. */
function bucketLabel(bounds, i) {
  return bounds[i] === "+Inf" ? `>${formatSeconds(bounds[i - 1])}` : `≤${formatSeconds(bounds[i])}`;
}

export function formatBytes(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KiB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MiB`;
}

/** The bucket holding the observation at `share` (0.5: the median), from per-bucket counts. */
function quantileBucket(histogram, share) {
  const wanted = histogram.count * share;
  let seen = 0;
  for (let i = 0; i < histogram.counts.length; i++) {
    seen += histogram.counts[i];
    if (seen >= wanted) return i;
  }
  return histogram.counts.length - 1;
}

/** A rolling time series: x in seconds since the epoch (what uPlot's time axis wants), one y per series. */
class Series {
  constructor() {
    this.times = [];
    this.values = new Map(); // name -> [y]
  }

  push(time, sample) {
    this.times.push(time);
    for (const [name, value] of Object.entries(sample)) {
      if (!this.values.has(name)) this.values.set(name, this.times.slice(0, -1).map(() => null));
      this.values.get(name).push(value);
    }
    for (const [name, list] of this.values) if (list.length < this.times.length) list.push(name in sample ? sample[name] : 0);
    if (this.times.length > WINDOW_POINTS) {
      this.times.shift();
      for (const list of this.values.values()) list.shift();
    }
  }

  data(names) {
    return [this.times, ...names.map((name) => this.values.get(name) || this.times.map(() => null))];
  }
}

function sizeOf(element) {
  return { width: Math.max(200, element.clientWidth), height: 150 };
}

function timeChart(element, names, unit, { legend = names.length > 1 } = {}) {
  const series = [{}, ...names.map((name, i) => ({
    label: name, stroke: PALETTE[i % PALETTE.length], width: 2, fill: names.length === 1 ? "#2f6fde1a" : undefined,
    points: { show: false }, value: (_, v) => (v == null ? "–" : `${formatRate(v)}${unit}`),
  }))];
  return new uPlot({
    ...sizeOf(element),
    series,
    legend: { show: legend, live: false },
    cursor: { show: false },
    scales: { x: { time: true }, y: { range: (_, min, max) => [0, Math.max(1, max * 1.15)] } },
    axes: [{ space: 60, size: 28 }, { size: 46, values: (_, ticks) => ticks.map(formatRate) }],
  }, [[], ...names.map(() => [])], element);
}

function histogramChart(element, bounds) {
  const labels = bounds.map((_, i) => bucketLabel(bounds, i));
  return new uPlot({
    ...sizeOf(element),
    series: [{}, { label: "events", stroke: "#2f6fde", fill: "#2f6fde99", paths: uPlot.paths.bars({ size: [0.8, 40] }),
      points: { show: false } }],
    legend: { show: false },
    cursor: { show: false },
    scales: { x: { time: false, range: [-0.5, bounds.length - 0.5] }, y: { range: (_, min, max) => [0, Math.max(1, max * 1.15)] } },
    axes: [
      { size: 44, space: 10, splits: () => bounds.map((_, i) => i), values: (_, ticks) => ticks.map((i) => labels[i] || ""),
        rotate: -50, font: "10px system-ui", gap: 2 },
      { size: 46, values: (_, ticks) => ticks.map(formatRate) },
    ],
  }, [bounds.map((_, i) => i), bounds.map(() => 0)], element);
}

export class LiveCharts {
  constructor(root) {
    this.root = root;
    this.previous = null; // the last answer and when it came
    this.totals = new Series();
    this.channelRates = new Series();
    this.charts = {};
    this.channelNames = [];
    this.rates = {};
    this.latencyHistory = []; // [{at, pid, histogram}] over the last minute
    this.observer = new ResizeObserver(() => this.resize());
    this.observer.observe(root);
  }

  /** One answer of /api/stats: move every chart. */
  update(stats, at = Date.now() / 1000) {
    const previous = this.previous;
    this.previous = { stats, at };
    const process = stats.process;
    let deliveries = null;
    const rates = {};
    if (previous && previous.stats.process.pid === process.pid && at > previous.at) {
      const span = at - previous.at;
      deliveries = Math.max(0, process.deliveries - previous.stats.process.deliveries) / span;
      for (const [name, channel] of Object.entries(stats.channels)) {
        const before = previous.stats.channels[name]?.events ?? 0;
        rates[name] = Math.max(0, channel.events - before) / span;
      }
    }
    /** Events per second per channel between the last two answers (empty after the first). */
    this.rates = rates;
    this.totals.push(at, { deliveries, connections: process.connections });
    this.channelRates.push(at, rates);

    this.chart("deliveries", ["deliveries"], "/s").setData(this.totals.data(["deliveries"]));
    this.chart("connections", ["connections"], "").setData(this.totals.data(["connections"]));
    this.root.querySelector("#now-deliveries").textContent = deliveries == null ? "" : formatRate(deliveries);
    this.root.querySelector("#now-connections").textContent = String(process.connections);
    this.showChannels();
    this.showLatency(stats.delivery_latency);
    this.root.dataset.updates = String(Number(this.root.dataset.updates || 0) + 1);
  }

  chart(name, names, unit) {
    if (!this.charts[name]) this.charts[name] = timeChart(this.root.querySelector(`#chart-${name}`), names, unit);
    return this.charts[name];
  }

  showChannels() {
    // The busiest channels over the window, in a stable order (by name) so colours do not jump.
    // Channels with no event in the window (the automatic rooms, mostly) get no line.
    const totals = [...this.channelRates.values].map(([name, list]) => [name, list.reduce((a, b) => a + (b || 0), 0)]);
    const busiest = totals.filter(([, total]) => total > 0).sort((a, b) => b[1] - a[1]).slice(0, MAX_CHANNEL_SERIES)
      .map(([name]) => name).sort();
    if (busiest.join("\n") !== this.channelNames.join("\n")) {
      this.charts.channels?.destroy();
      delete this.charts.channels;
      this.channelNames = busiest;
    }
    if (!this.charts.channels) {
      this.charts.channels = timeChart(this.root.querySelector("#chart-channels"), this.channelNames, "/s", { legend: true });
    }
    this.charts.channels.setData(this.channelRates.data(this.channelNames));
  }

  /** The histogram of the last minute: the server's counts since start, minus those of a minute ago. */
  showLatency(histogram) {
    if (!histogram) return;
    const now = this.previous.at;
    this.latencyHistory.push({ at: now, pid: this.previous.stats.process.pid, histogram });
    while (this.latencyHistory.length > 1 && (now - this.latencyHistory[0].at > LATENCY_WINDOW_S ||
           this.latencyHistory[0].pid !== this.previous.stats.process.pid)) this.latencyHistory.shift();
    const base = this.latencyHistory[0].histogram;
    const sinceStart = base === histogram; // the first answer: nothing to subtract yet
    const recent = {
      bounds: histogram.bounds,
      counts: histogram.counts.map((n, i) => (sinceStart ? n : n - (base.counts[i] || 0))),
    };
    recent.count = recent.counts.reduce((a, b) => a + b, 0);
    if (!this.charts.latency) this.charts.latency = histogramChart(this.root.querySelector("#chart-latency"), histogram.bounds);
    this.charts.latency.setData([histogram.bounds.map((_, i) => i), recent.counts]);
    const element = this.root.querySelector("#chart-latency");
    element.dataset.count = String(histogram.count);
    element.dataset.recent = String(recent.count);
    const summary = this.root.querySelector("#latency-summary");
    if (!recent.count) {
      summary.textContent = `none in the last minute · ${histogram.count} since start`;
      return;
    }
    const p50 = bucketLabel(histogram.bounds, quantileBucket(recent, 0.5));
    const p99 = bucketLabel(histogram.bounds, quantileBucket(recent, 0.99));
    summary.textContent = `${sinceStart ? "since start" : "last minute"}: ${recent.count} events · p50 ${p50} · p99 ${p99}`;
  }

  resize() {
    for (const [name, chart] of Object.entries(this.charts)) chart.setSize(sizeOf(this.root.querySelector(`#chart-${name}`)));
  }

  reset() {
    for (const chart of Object.values(this.charts)) chart.destroy();
    this.charts = {};
    this.channelNames = [];
    this.previous = null;
    this.latencyHistory = [];
    this.totals = new Series();
    this.channelRates = new Series();
  }
}
