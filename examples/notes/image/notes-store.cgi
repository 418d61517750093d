#!/bin/sh
# GET: the notes, as text (one line each: number, time, text).
printf 'Status: 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n'
cat /data/notes.txt
