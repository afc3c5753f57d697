// Ask before sending a form marked data-confirm (deleting a post cannot be undone).
// A static file, because the Content-Security-Policy allows no inline script.
"use strict";
document.addEventListener("submit", (event) => {
  const message = event.target instanceof HTMLFormElement ? event.target.dataset.confirm : undefined;
  if (message && !window.confirm(message)) {
    event.preventDefault();
  }
});
