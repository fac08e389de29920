// The result page: follows a running prediction, then drives the heatmap controls.
(function () {
  "use strict";
  var status = document.getElementById("status");
  if (status && (status.dataset.status === "queued" || status.dataset.status === "running")) {
    var bar = document.getElementById("progress");
    var text = document.getElementById("status-text");
    var percent = document.getElementById("percent");
    var poll = function () {
      fetch(status.dataset.poll, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
        .then(function (p) {
          if (p.status === "done" || p.status === "failed") { window.location.reload(); return; }
          text.textContent = p.status === "queued" ? "Waiting for a free worker" : "Predicting";
          bar.value = p.progress;
          bar.textContent = percent.textContent = Math.round(p.progress * 100) + "%";
          window.setTimeout(poll, 1000);
        })
        .catch(function () { window.setTimeout(poll, 3000); });
    };
    window.setTimeout(poll, 500);
  }

  var show = document.getElementById("show");
  var opacity = document.getElementById("opacity");
  var opacityValue = document.getElementById("opacity-value");
  var kind = document.getElementById("kind");
  if (!show || !opacity) { return; }
  var apply = function () {
    var chosen = kind ? kind.value : null;
    document.querySelectorAll(".layers").forEach(function (figure) {
      figure.classList.toggle("hidden", chosen !== null && figure.dataset.kind !== chosen);
      var heat = figure.querySelector("img.heat");
      heat.style.opacity = String(opacity.value / 100);
      heat.classList.toggle("off", !show.checked);
    });
    opacityValue.textContent = opacity.value + "%";
    opacity.disabled = !show.checked;
  };
  show.addEventListener("change", apply);
  opacity.addEventListener("input", apply);
  if (kind) { kind.addEventListener("change", apply); }
  apply();
})();
