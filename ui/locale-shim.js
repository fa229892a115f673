// WebKitGTK reports the POSIX locale ("C") as navigator.language when LANG is C or
// unset, and Intl rejects it as a language tag; uPlot (the charts) formats numbers
// with Intl while it loads and would fail. Fall back to a valid tag in that case.
try {
  new Intl.NumberFormat(navigator.language);
} catch (err) {
  Object.defineProperty(Navigator.prototype, "language", { get: () => "en-US", configurable: true });
  Object.defineProperty(Navigator.prototype, "languages", { get: () => ["en-US"], configurable: true });
}
