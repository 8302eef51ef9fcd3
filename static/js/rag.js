// Documents page: drag-and-drop (or choose) several files; each is uploaded on its own request
// and its row, returned by the server, polls its ingestion status through htmx.
(function () {
  function csrfToken() {
    try { return JSON.parse(document.body.getAttribute("hx-headers"))["X-CSRFToken"]; } catch (e) { return ""; }
  }

  function addRow(html) {
    var rows = document.getElementById("document-rows");
    var empty = document.getElementById("no-documents");
    if (empty) empty.remove();
    var template = document.createElement("template");
    template.innerHTML = html.trim();
    var row = template.content.firstElementChild;
    var existing = row.id && document.getElementById(row.id);
    if (existing) existing.replaceWith(row); else rows.prepend(row);
    if (window.htmx) window.htmx.process(row);
  }

  function pendingRow(file) {
    var row = document.createElement("tr");
    row.className = "document-row status-uploading";
    row.dataset.status = "uploading";
    var name = document.createElement("td");
    name.textContent = file.name;
    var status = document.createElement("td");
    status.colSpan = 5;
    status.innerHTML = '<span class="badge warn">uploading</span> <progress max="100" value="0"></progress>';
    row.append(name, status);
    document.getElementById("document-rows").prepend(row);
    return row;
  }

  function upload(zone, file) {
    var row = pendingRow(file);
    var data = new FormData();
    data.append("file", file);
    var xhr = new XMLHttpRequest();
    xhr.open("POST", zone.dataset.uploadUrl);
    xhr.setRequestHeader("X-CSRFToken", csrfToken());
    xhr.setRequestHeader("HX-Request", "true");
    xhr.upload.onprogress = function (event) {
      if (event.lengthComputable) row.querySelector("progress").value = Math.round(100 * event.loaded / event.total);
    };
    xhr.onload = function () {
      row.remove();
      if (xhr.responseText && /^\s*<tr/.test(xhr.responseText)) { addRow(xhr.responseText); return; }
      addRow('<tr class="document-row status-rejected" data-status="rejected"><td></td><td colspan="5"><span class="badge bad">rejected</span><div class="error" role="alert"></div></td></tr>');
      var added = document.querySelector("#document-rows tr");
      added.firstElementChild.textContent = file.name;
      added.querySelector(".error").textContent = "Upload failed (HTTP " + xhr.status + ")";
    };
    xhr.onerror = function () {
      row.querySelector("td:last-child").textContent = "Upload failed: the server could not be reached";
    };
    xhr.send(data);
  }

  function init() {
    var zone = document.getElementById("dropzone");
    if (!zone) return;
    var input = zone.querySelector("input[type=file]");
    function send(files) { Array.prototype.forEach.call(files, function (f) { upload(zone, f); }); }
    input.addEventListener("change", function () { send(input.files); input.value = ""; });
    ["dragenter", "dragover"].forEach(function (name) {
      zone.addEventListener(name, function (e) { e.preventDefault(); zone.classList.add("dragover"); });
    });
    ["dragleave", "drop"].forEach(function (name) {
      zone.addEventListener(name, function (e) { e.preventDefault(); zone.classList.remove("dragover"); });
    });
    zone.addEventListener("drop", function (e) { send(e.dataTransfer.files); });
    zone.addEventListener("submit", function (e) { e.preventDefault(); });
  }

  document.addEventListener("DOMContentLoaded", init);
})();
