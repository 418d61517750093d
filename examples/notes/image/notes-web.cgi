#!/bin/sh
# GET: the notes page. POST: the request's body is a note, queued when the header
# X-Notes-Token carries the app's NOTES_TOKEN (an encrypted secret, in allowed_envs).
reply() { printf 'Status: %s\r\nContent-Type: %s\r\n\r\n' "$1" "$2"; }
html() { sed -e 's/&/\&amp;/g' -e 's/</\&lt;/g' -e 's/>/\&gt;/g'; }
if [ "$REQUEST_METHOD" = POST ]; then
    if [ -z "$NOTES_TOKEN" ] || [ "$HTTP_X_NOTES_TOKEN" != "$NOTES_TOKEN" ]; then
        reply "403 Forbidden" text/plain
        echo "a note needs the header X-Notes-Token: the app's NOTES_TOKEN (secrets.env)"
        exit 0
    fi
    length="${CONTENT_LENGTH:-0}"
    if [ "$length" -lt 1 ] || [ "$length" -gt 2000 ]; then
        reply "400 Bad Request" text/plain
        echo "a note is 1 to 2000 bytes of text"
        exit 0
    fi
    # Written aside, then renamed: the store service never reads half a note.
    queued="/data/inbox/$(date +%s)-$$"
    head -c "$length" > "/data/inbox/.new-$$" && mv "/data/inbox/.new-$$" "$queued"
    reply "202 Accepted" text/plain
    echo "queued; the store service adds it to the notes"
    exit 0
fi
reply "200 OK" "text/html; charset=utf-8"
cat <<PAGE
<!doctype html>
<title>$(printf '%s' "${NOTES_TITLE:-Notes}" | html)</title>
<h1>$(printf '%s' "${NOTES_TITLE:-Notes}" | html)</h1>
<p>Served from a confidential VM deployed with dstack.tee. ADMIN_PASSWORD is
$([ -n "$ADMIN_PASSWORD" ] && echo "set (it should not be: it is not in allowed_envs)" || echo "not set: not in allowed_envs, so it never left the controller").</p>
<pre>
$(html < /data/notes.txt 2>/dev/null)
</pre>
PAGE
