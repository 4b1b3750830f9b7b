// Live refresh for the passbridge dashboard: every element with data-refresh="<url>" gets its contents replaced
// by that URL's HTML fragment every data-every milliseconds (default 3000), while the tab is visible.
// A fragment containing [data-stop-refresh] ends the refreshing (e.g. an event that has been delivered).
"use strict";
(function () {
  function start(el) {
    var every = parseInt(el.getAttribute("data-every") || "3000", 10);
    var busy = false;
    var timer = setInterval(function () {
      if (busy || document.hidden) return;
      busy = true;
      fetch(el.getAttribute("data-refresh"), {
        credentials: "same-origin",
        headers: { "X-Dashboard-Fragment": "1" },
      })
        .then(function (r) {
          if (r.status === 401) {
            clearInterval(timer);
            el.insertAdjacentHTML("afterbegin", '<p class="error">Session expired: reload the page to log in.</p>');
            return null;
          }
          return r.ok ? r.text() : null;
        })
        .then(function (html) {
          if (html === null) return;
          el.innerHTML = html;
          el.setAttribute("data-refreshed", String(Date.now()));
          if (el.querySelector("[data-stop-refresh]")) clearInterval(timer);
        })
        .catch(function () {})
        .finally(function () {
          busy = false;
        });
    }, every);
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-refresh]").forEach(start);
  });
})();
