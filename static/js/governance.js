// Governance pages: live countdowns, and error panels swapped in place.
(function () {
  "use strict";

  function format(seconds) {
    if (seconds <= 0) return "now";
    var d = Math.floor(seconds / 86400), h = Math.floor(seconds % 86400 / 3600),
        m = Math.floor(seconds % 3600 / 60), s = Math.floor(seconds % 60);
    if (d) return d + "d " + h + "h";
    if (h) return h + "h " + m + "m";
    if (m) return m + "m " + s + "s";
    return s + "s";
  }

  // Time left ticks every second; htmx swaps in fresh elements, so query each tick.
  function tick() {
    var now = Date.now();
    document.querySelectorAll("[data-deadline]").forEach(function (el) {
      var end = Date.parse(el.getAttribute("data-deadline"));
      if (!isNaN(end)) el.textContent = format((end - now) / 1000);
    });
  }
  setInterval(tick, 1000);
  document.addEventListener("DOMContentLoaded", tick);

  // A refused vote or deposit answers 4xx with the panel showing why; swap it in like a 200.
  document.addEventListener("htmx:beforeSwap", function (event) {
    var status = event.detail.xhr.status;
    if (status >= 400 && status < 500 && event.detail.target.closest("[data-gov-panel]")) {
      event.detail.shouldSwap = true;
      event.detail.isError = false;
    }
  });
})();
