# Install Quire from the offline bundle next to this script (no network access).
param([string]$Prefix = "$env:LOCALAPPDATA\Quire")
$ErrorActionPreference = "Stop"
$here = Split-Path -Parent $MyInvocation.MyCommand.Path
py -3.11 -m venv "$Prefix\venv"
& "$Prefix\venv\Scripts\pip.exe" install --no-index --find-links "$here\wheels" quire
$shell = New-Object -ComObject WScript.Shell
$link = $shell.CreateShortcut("$env:APPDATA\Microsoft\Windows\Start Menu\Programs\Quire.lnk")
$link.TargetPath = "$Prefix\venv\Scripts\quire.exe"
$link.Save()
Write-Host "Quire installed: $Prefix\venv\Scripts\quire.exe"
